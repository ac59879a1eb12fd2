"""CorDA's config: a ``LoraConfig`` (plain init at attach) with CorDA's mode and calibration size."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from hf_lowrank_lora import LoraMethodConfig
from hf_lowrank_plugins import ConfigError


@dataclass
class CordaMethodConfig(LoraMethodConfig):
    """CorDA: A, B from the SVD of W C (C: the covariance of the layer's inputs on the training data),
    base W - s*B@A.

    ``corda_method="ipm"`` (instruction-previewed) takes the r largest components, so the adapter
    starts from what the task's data uses; ``"kpm"`` (knowledge-preserving) the r smallest, leaving
    what the data uses in the frozen base. Every LoRA option applies; the layers start as plain LoRA
    at attach and are decomposed when training begins, on ``calibration_batches`` of the Trainer's
    batches.
    """

    corda_method: Literal["ipm", "kpm"] = field(
        default="ipm",
        metadata={"help": "ipm: adapt the r largest components of W C (instruction-previewed); kpm: the r smallest"},
    )
    calibration_batches: int = field(
        default=8, metadata={"help": "training batches whose layer inputs give each covariance C", "min": 1}
    )

    BASE_KEEPING_INITS: ClassVar[tuple[bool | str, ...]] = (True,)
    OTHER_INITS_REFUSED: ClassVar[str] = "CorDA initialises the adapter from the decomposition itself"

    def check(self) -> None:
        """DoRA's magnitude is refused: the export to a plain LoRA on the original W is exact without it."""
        if self.use_dora:
            raise ConfigError("CorDA cannot be combined with use_dora=True here; use method 'dora' or 'corda'")
