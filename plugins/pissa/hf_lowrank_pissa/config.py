"""PiSSA's config: a ``LoraConfig`` whose ``init_lora_weights`` comes from the SVD settings."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from hf_lowrank_lora import LoraMethodConfig, peft_meta
from hf_lowrank_plugins import ConfigError


@dataclass
class PissaConfig(LoraMethodConfig):
    """PiSSA: A, B from the top-r singular triplets of W, frozen base W_res = W - s*B@A.

    Attributes (besides every LoRA option):
        svd: ``"exact"`` (``torch.linalg.svd``) or ``"fast"`` (randomized ``torch.svd_lowrank``
            with ``svd_niter`` subspace iterations; seconds instead of minutes on 7B models).
        svd_niter: subspace iterations of the fast SVD.
        svd_seed: seed of the fast SVD's random projection, so that attaching again (resume, other
            DDP ranks, reproducing a run) gives bit-identical A, B and W_res.
        quantize_residual: QPiSSA. Run the SVD on the full-precision model, then quantize W_res to
            4-bit NF4 (needs the ``quantization`` extra of the core). ``attach(..., load_in_4bit=True)`` does the same
            (the core leaves quantization to this method so the SVD sees full-precision W); this
            field keeps the choice in the saved config and on the CLI (``--set quantize_residual=true``).
        lora_alpha: defaults to ``r`` (the official recipe uses r = alpha), so s = 1.

    Defaults follow the paper: ``lora_dropout=0``. ``init_lora_weights`` is derived from ``svd``
    (``"pissa"`` or ``"pissa_niter_N"``) and must not be set by hand.
    """

    lora_alpha: int | float | None = field(  # type: ignore[assignment]  # None: set to r in __post_init__
        default=None, metadata=peft_meta("lora_alpha", help="LoRA alpha; default r (s = 1, the official recipe)")
    )
    lora_dropout: float = field(default=0.0, metadata=peft_meta("lora_dropout"))
    svd: Literal["exact", "fast"] = field(
        default="exact",
        metadata={
            "help": "exact: torch.linalg.svd; fast: seeded randomized torch.svd_lowrank (seconds instead of minutes on 7B)"
        },
    )
    svd_niter: int = field(default=16, metadata={"help": "subspace iterations of the fast SVD", "min": 1})
    svd_seed: int = field(
        default=0,
        metadata={
            "help": "seed of the fast SVD's projection: attaching again gives bit-identical A, B and W_res",
            "min": 0,
        },
    )
    quantize_residual: bool = field(
        default=False, metadata={"help": "QPiSSA: SVD in fp32, then W_res in 4-bit NF4 (the same as load_in_4bit=True)"}
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type of W_res"})
    bnb_4bit_use_double_quant: bool = field(default=True, metadata={"help": "quantize the quantization constants too"})
    bnb_4bit_compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "dtype 4-bit matmuls dequantize to; auto: bfloat16 on a GPU, float32 on CPU"}
    )

    #: PiSSA sets ``init_lora_weights`` from ``svd`` (and exports a plain LoRA on the original weights)
    BASE_KEEPING_INITS: ClassVar[tuple[bool | str, ...]] = (True,)
    OWN_INITS: ClassVar[tuple[str, ...]] = ("pissa",)
    OTHER_INITS_REFUSED: ClassVar[str] = "PiSSA initialises the adapter from the SVD itself"

    def __post_init__(self) -> None:
        if self.lora_alpha is None:
            self.lora_alpha = self.r
        if self.use_dora:
            # the rank-2r conversion to a plain LoRA on W is exact only without DoRA's magnitude
            raise ConfigError(
                "PiSSA cannot be combined with use_dora=True here; use method 'dora' or 'pissa', not both"
            )
        self._check_init()  # before it is derived, so another init is refused rather than dropped
        init = "pissa" if self.svd == "exact" else f"pissa_niter_{self.svd_niter}"
        if self.init_lora_weights not in (True, init):
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} disagrees with svd={self.svd!r}, "
                f"svd_niter={self.svd_niter} (which give {init!r}); set svd and svd_niter, not init_lora_weights"
            )
        # PEFT annotates the fast SVD's value as the literal "pissa_niter_[number of iters]"
        self.init_lora_weights = init  # type: ignore[assignment]
        with warnings.catch_warnings():
            # PEFT warns that its own conversion cannot handle rsLoRA with rank/alpha patterns; ours can
            warnings.filterwarnings("ignore", message="Using Rank-Stabilized LoRA with rank_pattern")
            super().__post_init__()
