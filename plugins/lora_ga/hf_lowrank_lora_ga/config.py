"""LoRA-GA's config: a ``LoraConfig`` plus the gradient-estimate and initialisation settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from hf_lowrank_lora import LoraMethodConfig, peft_meta
from hf_lowrank_plugins import ConfigError

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "gd", "unit", "weight_svd")
ESTIMATORS = ("sketch", "full")
SVDS = ("randomized", "exact")
VARIANTS = ("official", "peft")


@dataclass
class LoraGaConfig(LoraMethodConfig):
    """LoRA-GA: A, B from the SVD of the averaged full-weight gradient G, base W_res = W - s*B@A.

    Attributes (besides every LoRA option):
        ga_batches: number of batches the gradient G is averaged over (mean of the per-batch
            mean-loss gradients, as in the official code).
        ga_batch_size: examples per estimate batch. ``None`` (default) uses the Trainer's training
            batches as they come (``per_device_train_batch_size``); a smaller value splits each
            of them into chunks of this size (lower activation memory during the estimate). It
            cannot exceed the dataloader's batch size.
        estimator: ``"full"`` (default) keeps the exact sum per target weight, as the batches'
            factors ``(x, dL/dy)`` while those are smaller than the fp32 ``m x n`` sum and as that
            sum from then on, for 1/``ga_layer_groups`` of the targets at a time (one pass over the
            cached batches per group); ``"sketch"`` folds every gradient into a seeded randomized
            two-sided sketch of the running sum, ``k*(m+n) + l*n`` floats per layer instead of
            ``m*n``, in one pass, but only approximates the directions r+1..2r (see the README's
            measurements).
        sketch_rank: k, the sketch's rank; default ``min(4r, min(m, n))`` (the q of the paper's
            randomized SVD). The co-range sketch has ``l = min(2k + 1, m)`` rows.
        ga_layer_groups: ``"full"`` only (ignored by the sketch): split the targets into this many
            groups and run one pass over the (cached) batches per group, so only one group's
            accumulators exist; the factors are the same for every count (bit for bit), only time
            and memory change. ``None`` (default): the fewest groups whose sums add at most a tenth
            of the memory in use to a pass's peak, sized in the first pass after its first forward
            (the memory then holds the weights, on a CPU the libraries, and one batch's
            activations: about a LoRA step's peak; the sums of every batch but the last are what they
            add at the peak; layers that read the same input keep it once). The estimate's peak stays
            within about 1.1x of a LoRA training step's at any model size; on SmolLM2-135M with two
            batches of 2 x 64 tokens that is one pass, level with PEFT's ``preprocess_loraga`` in
            time (0.90-0.92x, within this machine's noise) at 0.80x its peak
            (``benchmarks/results/lora_ga_init_sized.json``).
        svd: ``"randomized"`` (``torch.svd_lowrank`` with ``q = min(4r, min(m, n))``,
            ``svd_niter`` iterations, seeded by ``ga_seed``) or ``"exact"`` (``torch.linalg.svd``).
            The sketch always ends in an exact SVD of its small reconstruction.
        direction: which of the top-2r singular directions go to A and B: ``"ArB2r"`` (A = top-r
            right vectors, B = left vectors r+1..2r), ``"A2rBr"``, ``"ArBr"`` (alternating), or
            ``"random"`` (a seeded split of the 2r indices).
        scale: ``"stable"`` (A and B each times ``d_out**0.25 / sqrt(stable_gamma)``), ``"gd"``
            (each divided by the LoRA scaling s), ``"unit"``, ``"weight_svd"`` (each times the mean
            of ``sqrt(S_W[:r] / s)``, S_W the singular values of W).
        stable_gamma: gamma of the ``"stable"`` scale (16 in the official code).
        variant: ``"official"`` (the official code's formulas, above) or ``"peft"`` (PEFT 0.21's
            ``init_lora_weights="lora_ga"``: B times diag(S), ``"stable"`` and ``"weight_svd"``
            scale B only, ``"random"`` uses the same indices for A and B).
        ga_seed: seed of the sketch's test matrices, the randomized SVD, the ``"random"`` direction
            and the dropout masks of the estimate (the caller's RNG state is left untouched).
        use_rslora: on by default, as in the paper (s = alpha / sqrt(r)).
        lora_alpha: 16 by default (with rsLoRA, s = 16 / sqrt(r)).

    ``init_lora_weights`` is forced to ``True`` (B = 0): the model equals the base from attach until
    the data-dependent initialisation at train begin. ``use_dora=True`` is refused.
    """

    lora_alpha: int | float = field(
        default=16, metadata=peft_meta("lora_alpha", help="LoRA alpha; with rsLoRA s = alpha / sqrt(r)")
    )
    use_rslora: bool = field(
        default=True, metadata=peft_meta("use_rslora", help="s = alpha / sqrt(r), as in the paper")
    )
    ga_batches: int = field(default=8, metadata={"help": "batches the train-start gradient is averaged over", "min": 1})
    ga_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "examples per estimate batch; None: the Trainer's batches as they come (smaller: less memory)",
            "min": 1,
        },
    )
    estimator: Literal["full", "sketch"] = field(
        default="full",
        metadata={
            "help": "full: exact fp32 accumulator per target (by layer group); sketch: one-pass randomized sketch"
        },
    )
    sketch_rank: int | None = field(
        default=None, metadata={"help": "rank k of the sketch; None: min(4r, m, n)", "min": 1}
    )
    ga_layer_groups: int | None = field(
        default=None,
        metadata={
            "help": "full estimator: passes over the cached batches, one layer group each; None: the fewest whose "
            "sums add at most a tenth of the memory in use to a pass (within about 1.1x a LoRA step's peak)",
            "min": 1,
        },
    )
    svd: Literal["randomized", "exact"] = field(
        default="randomized",
        metadata={"help": "SVD of the gradient: seeded torch.svd_lowrank (q = 4r) or torch.linalg.svd"},
    )
    svd_niter: int = field(default=4, metadata={"help": "subspace iterations of the randomized SVD", "min": 1})
    direction: Literal["ArB2r", "A2rBr", "ArBr", "random"] = field(
        default="ArB2r", metadata={"help": "which of the top-2r gradient directions go to A and B (ArB2r: the paper's)"}
    )
    scale: Literal["stable", "gd", "unit", "weight_svd"] = field(
        default="stable",
        metadata={"help": "scaling of A and B (stable: d_out**0.25 / sqrt(stable_gamma), the paper's)"},
    )
    stable_gamma: float = field(default=16, metadata={"help": "gamma of the stable scale", "min_exclusive": 0})
    variant: Literal["official", "peft"] = field(
        default="official",
        metadata={"help": "official: the official code's formulas; peft: PEFT 0.21's init_lora_weights='lora_ga'"},
    )
    ga_seed: int = field(
        default=0,
        metadata={
            "help": "seed of the sketch, the randomized SVD, the random direction and the estimate's dropout",
            "min": 0,
        },
    )

    #: B = 0 at attach; the gradient init replaces A and B after, so PEFT's own inits have no say
    BASE_KEEPING_INITS: ClassVar[tuple[bool | str, ...]] = (True,)
    OWN_INITS: ClassVar[tuple[str, ...]] = ("lora_ga",)
    OTHER_INITS_REFUSED: ClassVar[str] = "LoRA-GA initialises the adapter from the gradients itself"

    def __post_init__(self) -> None:
        self._check_init()  # before it is forced, so another init is refused rather than dropped
        self.init_lora_weights = True
        super().__post_init__()

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the fix for any setting LoRA-GA cannot use."""
        choices = {"direction": DIRECTIONS, "scale": SCALES, "estimator": ESTIMATORS, "svd": SVDS, "variant": VARIANTS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        positive = {"ga_batches": self.ga_batches, "svd_niter": self.svd_niter}
        optional = {
            "ga_batch_size": self.ga_batch_size,
            "sketch_rank": self.sketch_rank,
            "ga_layer_groups": self.ga_layer_groups,
        }
        positive.update({k: v for k, v in optional.items() if v is not None})
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.stable_gamma > 0:
            raise ConfigError(f"stable_gamma must be > 0, got {self.stable_gamma!r}")
        if self.sketch_rank is not None and isinstance(self.r, int) and self.sketch_rank < 2 * self.r:
            raise ConfigError(
                f"sketch_rank {self.sketch_rank} is below 2r = {2 * self.r}: the sketch must see the 2r directions "
                "LoRA-GA uses; leave sketch_rank unset (4r) or raise it"
            )
        if self.use_dora:
            raise ConfigError("LoRA-GA cannot be combined with use_dora=True; use method 'dora' or 'lora_ga', not both")
