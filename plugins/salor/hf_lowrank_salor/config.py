"""SALOR's config: a ``LoraConfig`` plus where the sparsity goes, how much, and in which pattern."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from hf_lowrank_lora import LoraMethodConfig, peft_meta
from hf_lowrank_lora.config import is_peft_init
from hf_lowrank_plugins import ConfigError

PATTERNS = ("unstructured", "global", "2:4")
TARGETS = ("base", "adapter", "both")
REPAIR_INITS = ("auto", "svd", "lora")
#: PEFT's ``init_lora_weights`` values that leave the base weights alone and need no data
DATA_FREE_LORA_INITS = (True, False, "gaussian")
SCHEDULES = ("static", "cubic")


@dataclass
class SalorConfig(LoraMethodConfig):
    """SALOR: frozen base pruned by magnitude (static mask) + LoRA initialised to the rank-r SVD of
    the pruning residual; optionally sparse LoRA factors.

    Attributes (besides every LoRA option; ``lora_alpha`` defaults to ``r`` so s = 1):
        sparsity: fraction of each target base weight set to zero (``0 <= sparsity < 1``); must be
            0.5 with ``sparsity_pattern="2:4"``.
        sparsity_pattern: ``"unstructured"`` (smallest |w| of each layer), ``"global"`` (one magnitude
            threshold across all target layers, so per-layer sparsity varies) or ``"2:4"`` (two
            largest |w| kept in every group of 4 consecutive inputs of a row: the pattern of GPU
            sparse tensor cores).
        sparsity_target: ``"base"`` (the paper: prune W, adapters dense), ``"adapter"`` (the second
            reading: dense W, magnitude-sparse A and B) or ``"both"``.
        adapter_sparsity: fraction of zeros in each of A and B when the adapter is sparse.
        adapter_schedule: ``"static"`` (masks fixed at attach time) or ``"cubic"`` (Zhu & Gupta
            gradual magnitude pruning: sparsity ramps from 0 to ``adapter_sparsity`` over the first
            ``adapter_schedule_steps`` optimizer steps, then the mask is frozen).
        adapter_schedule_steps: length of the cubic ramp in optimizer steps.
        repair_init: ``"svd"`` (B A = E_r, the rank-r SVD of E = W - prune(W)), ``"lora"`` (PEFT's
            default B = 0: "pruning + plain LoRA") or ``"auto"`` (svd when the base is pruned).
        svd: ``"exact"`` (``torch.linalg.svd``) or ``"fast"`` (seeded randomized ``torch.svd_lowrank``
            with ``svd_niter`` subspace iterations: seconds instead of minutes on a 135M model).
        svd_niter, svd_seed: iterations and seed of the fast SVD.
        mask_seed: seed of the random mask used for a factor that is all zeros at attach time
            (B of a plain-LoRA init), whose magnitudes say nothing.
        fuse: default of :func:`hf_lowrank_salor.fused.build_inference_model`: compute the adapters
            (and sparse bases) of q/k/v and gate/up as one concatenated GEMM each.
        quantize_base: store the pruned base in 4-bit NF4 (needs the core's ``quantization`` extra); NF4 has an
            exact zero, so the sparsity pattern survives quantization.
    """

    lora_alpha: int | float | None = field(  # type: ignore[assignment]  # None: set to r in __post_init__
        default=None, metadata=peft_meta("lora_alpha", help="LoRA alpha; default r (s = 1)")
    )
    lora_dropout: float = field(default=0.0, metadata=peft_meta("lora_dropout"))
    sparsity: float = field(
        default=0.5,
        metadata={
            "help": "fraction of each target base weight set to zero (0.5 with 2:4)",
            "min": 0,
            "max_exclusive": 1,
        },
    )
    sparsity_pattern: Literal["unstructured", "global", "2:4"] = field(
        default="unstructured",
        metadata={"help": "unstructured: per layer; global: one threshold across layers; 2:4: GPU sparse tensor cores"},
    )
    sparsity_target: Literal["base", "adapter", "both"] = field(
        default="base", metadata={"help": "base: prune W (the paper); adapter: sparse A and B; both"}
    )
    adapter_sparsity: float = field(
        default=0.5,
        metadata={
            "help": "fraction of zeros in each of A and B when the adapter is sparse",
            "min": 0,
            "max_exclusive": 1,
        },
    )
    adapter_schedule: Literal["static", "cubic"] = field(
        default="static",
        metadata={"help": "static: masks fixed at attach; cubic: Zhu & Gupta ramp over adapter_schedule_steps"},
    )
    adapter_schedule_steps: int = field(default=0, metadata={"help": "optimizer steps of the cubic ramp", "min": 0})
    repair_init: Literal["auto", "svd", "lora"] = field(
        default="auto",
        metadata={
            "help": "svd: B A = rank-r SVD of what pruning removed; lora: B = 0; auto: svd when the base is pruned"
        },
    )
    svd: Literal["exact", "fast"] = field(
        default="exact", metadata={"help": "exact: torch.linalg.svd; fast: seeded randomized torch.svd_lowrank"}
    )
    svd_niter: int = field(default=8, metadata={"help": "subspace iterations of the fast SVD", "min": 1})
    svd_seed: int = field(default=0, metadata={"help": "seed of the fast SVD", "min": 0})
    mask_seed: int = field(default=0, metadata={"help": "seed of the random mask of an all-zero factor", "min": 0})
    fuse: bool = field(default=True, metadata={"help": "inference module: one GEMM for q/k/v and for gate/up adapters"})
    quantize_base: bool = field(
        default=False, metadata={"help": "store the pruned base in 4-bit NF4 (the same as load_in_4bit=True)"}
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type of the base"})
    bnb_4bit_use_double_quant: bool = field(default=True, metadata={"help": "quantize the quantization constants too"})
    bnb_4bit_compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "dtype 4-bit matmuls dequantize to; auto: bfloat16 on a GPU, float32 on CPU"}
    )

    BASE_KEEPING_INITS: ClassVar[tuple[bool | str, ...]] = DATA_FREE_LORA_INITS

    def __post_init__(self) -> None:
        if self.lora_alpha is None:
            self.lora_alpha = self.r
        _choice("sparsity_pattern", self.sparsity_pattern, PATTERNS)
        _choice("sparsity_target", self.sparsity_target, TARGETS)
        _choice("repair_init", self.repair_init, REPAIR_INITS)
        _choice("adapter_schedule", self.adapter_schedule, SCHEDULES)
        _choice("svd", self.svd, ("exact", "fast"))
        if self.svd == "fast" and self.svd_niter < 1:
            raise ConfigError(f"svd_niter must be >= 1 for the fast SVD, got {self.svd_niter}")
        for name in ("sparsity", "adapter_sparsity"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (0 <= value < 1)
                or math.isnan(value)
            ):
                raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")
        if self.sparsity_pattern == "2:4" and self.prunes_base and self.sparsity != 0.5:
            raise ConfigError(
                f"sparsity_pattern='2:4' keeps 2 of every 4 weights, i.e. sparsity 0.5; got sparsity={self.sparsity}"
            )
        if self.adapter_schedule == "cubic" and self.adapter_schedule_steps < 1:
            raise ConfigError("adapter_schedule='cubic' needs adapter_schedule_steps >= 1 (length of the ramp)")
        if self.repair_init == "svd" and not self.prunes_base:
            raise ConfigError(
                "repair_init='svd' approximates the pruning residual of the base, but sparsity_target='adapter' "
                "prunes no base weight (the residual is zero); use repair_init='lora' or 'auto'"
            )
        if self.use_dora:
            raise ConfigError("SALOR cannot be combined with use_dora=True (DoRA rescales the sparse base rows)")
        if is_peft_init(self.init_lora_weights) and self.init_lora_weights not in DATA_FREE_LORA_INITS:
            raise ConfigError(
                f"SALOR cannot be combined with init_lora_weights={self.init_lora_weights!r}: that initialisation "
                "rewrites the base weights (or needs data) before SALOR prunes them, and SALOR's repair then replaces "
                "its factors, so the model would be neither; SALOR initialises its adapter itself (repair_init). "
                "Use True, False or 'gaussian'"
            )
        super().__post_init__()

    @property
    def prunes_base(self) -> bool:
        """True when the frozen base weights are pruned (``sparsity_target`` base or both, sparsity > 0)."""
        return self.sparsity_target in ("base", "both") and self.sparsity > 0

    @property
    def sparse_adapter(self) -> bool:
        """True when the LoRA factors carry magnitude masks."""
        return self.sparsity_target in ("adapter", "both") and self.adapter_sparsity > 0

    @property
    def effective_repair_init(self) -> str:
        """``"svd"`` or ``"lora"`` after resolving ``"auto"``."""
        if self.repair_init == "auto":
            return "svd" if self.prunes_base else "lora"
        return self.repair_init


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
