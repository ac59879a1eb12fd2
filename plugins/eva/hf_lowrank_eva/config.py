"""EVA's config: a ``LoraConfig`` whose ``init_lora_weights`` is PEFT's ``"eva"``, EVA's settings as flat fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from peft import EvaConfig

from hf_lowrank_lora import LoraMethodConfig


@dataclass
class EvaMethodConfig(LoraMethodConfig):
    """EVA: A = the top right-singular vectors of each target layer's inputs on the training data, B = 0.

    Every LoRA option applies; ``r`` is the average rank, which ``rho`` lets EVA redistribute. The
    EVA settings are flat fields (``--set rho=1``) and are handed to PEFT as its ``eva_config``;
    ``init_lora_weights`` is ``"eva"`` and is not set by hand.
    """

    rho: float = field(
        default=2.0,
        metadata={
            "help": "rank redistribution: a layer may take up to round(r * rho) of the budget r per layer (1: none)",
            "min": 1.0,
        },
    )
    tau: float = field(
        default=0.99,
        metadata={
            "help": "a component has converged when its cosine similarity to the previous batch's reaches tau",
            "min": 0.0,
            "max": 1.0,
        },
    )
    whiten: bool = field(
        default=False, metadata={"help": "divide each component by the square root of its singular value"}
    )
    adjust_scaling_factors: bool = field(
        default=True, metadata={"help": "scale lora_alpha with a layer's new rank, so s = alpha / r stays as set"}
    )
    use_label_mask: bool = field(
        default=True, metadata={"help": "take the SVD only over tokens whose label is not -100 (the completion)"}
    )
    svd_max_batches: int = field(
        default=256,
        metadata={
            "help": "stop with an error when the SVD has not converged after this many batches (PEFT would loop on)",
            "min": 1,
        },
    )

    BASE_KEEPING_INITS: ClassVar[tuple[bool | str, ...]] = (True,)
    OWN_INITS: ClassVar[tuple[str, ...]] = ("eva",)
    OTHER_INITS_REFUSED: ClassVar[str] = "EVA initialises A from the layers' inputs itself"
    DERIVED_FIELDS: ClassVar[dict[str, str]] = {
        "eva_config": "PEFT's EvaConfig, built from rho, tau, use_label_mask, whiten and adjust_scaling_factors"
    }

    def __post_init__(self) -> None:
        self._check_init()  # before it is set, so another init is refused rather than dropped
        self.init_lora_weights = "eva"
        self.eva_config = None  # rebuilt from the flat fields by check(), also when a saved config is read back
        super().__post_init__()

    def check(self) -> None:
        """Build PEFT's own ``eva_config`` from the flat fields, once their types and ranges were checked
        and before PEFT's ``__post_init__`` reads it."""
        self.eva_config = EvaConfig(
            rho=self.rho,
            tau=self.tau,
            use_label_mask=self.use_label_mask,
            whiten=self.whiten,
            adjust_scaling_factors=self.adjust_scaling_factors,
        )
