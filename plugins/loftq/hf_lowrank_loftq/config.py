"""LoftQ's config: a ``LoraConfig`` for a 4-bit base whose adapter the quantization error initialises."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from hf_lowrank_lora import LoraMethodConfig
from hf_lowrank_plugins import ConfigError, QuantizationFields


@dataclass
class LoftqConfig(LoraMethodConfig, QuantizationFields):
    """LoftQ: the base is NF4(W) as QLoRA's; A, B start as the top-r SVD of W - deq(NF4(W)), so the
    adapted 4-bit model starts closer to the full-precision one than QLoRA's (which starts at deq(NF4(W))).

    Every LoRA option applies; ``bnb_4bit_*`` settings are QLoRA's (``--set bnb_4bit_quant_type=fp4``).
    ``loftq_iter=1`` (PEFT's ``replace_lora_weights_loftq``): the base stays NF4(W), which loading the
    original model in 4-bit reproduces, so the adapter is portable on its own. More alternations
    (the paper's T; PEFT's ``LoftQConfig(loftq_iter=T)``) quantize ``W - s·B·A`` instead, so the
    export writes that base beside the adapter (``base/``).
    """

    loftq_iter: int = field(
        default=1,
        metadata={
            "help": "alternations of quantizing W - s*B@A and decomposing what it lost (the paper's T); above 1 "
            "the base is no longer NF4(W) and is exported in base/",
            "min": 1,
        },
    )

    BASE_KEEPING_INITS: ClassVar[tuple[bool | str, ...]] = (True,)
    OTHER_INITS_REFUSED: ClassVar[str] = "LoftQ initialises the adapter from the quantization error itself"

    def rewrites_base(self) -> bool:
        """Whether the trained base is another than NF4(W), which a QLoRA loader rebuilds: with more than
        one alternation (the core then refuses this method's Trainer checkpoints on the original base)."""
        return int(self.loftq_iter) > 1

    def check(self) -> None:
        """DoRA's magnitude is refused: LoftQ's factors repair W - deq(Q(W)) additively."""
        if self.use_dora:
            raise ConfigError("LoftQ cannot be combined with use_dora=True here; use method 'loftq' or 'dora'")
