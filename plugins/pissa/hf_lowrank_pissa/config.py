"""PiSSA's config: a ``LoraConfig`` whose ``init_lora_weights`` comes from the SVD settings."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

from hf_lowrank_lora import LoraMethodConfig

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
            4-bit NF4 (needs hf-lowrank-qlora). ``attach(..., load_in_4bit=True)`` does the same
            (the core leaves quantization to this method so the SVD sees full-precision W); this
            field keeps the choice in the saved config and on the CLI (``--set quantize_residual=true``).
        lora_alpha: defaults to ``r`` (the official recipe uses r = alpha), so s = 1.

    Defaults follow the paper: ``lora_dropout=0``. ``init_lora_weights`` is derived from ``svd``
    (``"pissa"`` or ``"pissa_niter_N"``) and must not be set by hand.
    """

    lora_alpha: int | None = field(default=None)
    lora_dropout: float = field(default=0.0)
    svd: Literal["exact", "fast"] = "exact"
    svd_niter: int = 16
    svd_seed: int = 0
    quantize_residual: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "auto"
    hf_lowrank_method: str = "pissa"

    def __post_init__(self) -> None:
        if self.lora_alpha is None:
            self.lora_alpha = self.r
        if self.svd not in ("exact", "fast"):
            raise ConfigError(f"svd must be 'exact' or 'fast', got {self.svd!r}")
        if self.svd == "fast" and self.svd_niter < 1:
            raise ConfigError(f"svd_niter must be >= 1 for the fast SVD, got {self.svd_niter}")
        if self.use_dora:
            # the rank-2r conversion to a plain LoRA on W is exact only without DoRA's magnitude
            raise ConfigError("PiSSA cannot be combined with use_dora=True here; use method 'dora' or 'pissa', not both")
        self.init_lora_weights = "pissa" if self.svd == "exact" else f"pissa_niter_{self.svd_niter}"
        with warnings.catch_warnings():
            # PEFT warns that its own conversion cannot handle rsLoRA with rank/alpha patterns; ours can
            warnings.filterwarnings("ignore", message="Using Rank-Stabilized LoRA with rank_pattern")
            super().__post_init__()
