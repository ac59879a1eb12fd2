"""LoftQ's config: a ``LoraConfig`` for a 4-bit base whose adapter the quantization error initialises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hf_lowrank_lora import LoraMethodConfig
from hf_lowrank_plugins import ConfigError


@dataclass
class LoftqConfig(LoraMethodConfig):
    """LoftQ: the base is NF4(W) as QLoRA's; A, B start as the top-r SVD of W - deq(NF4(W)), so the
    adapted 4-bit model starts closer to the full-precision one than QLoRA's (which starts at deq(NF4(W))).

    Every LoRA option applies; ``bnb_4bit_*`` settings are QLoRA's (``--set bnb_4bit_quant_type=fp4``).
    One alternation (PEFT's ``replace_lora_weights_loftq``): the base stays NF4(W), which loading the
    original model in 4-bit reproduces, so the adapter is portable.
    """

    BASE_KEEPING_INITS: ClassVar[tuple[bool | str, ...]] = (True,)
    OTHER_INITS_REFUSED: ClassVar[str] = "LoftQ initialises the adapter from the quantization error itself"

    def check(self) -> None:
        """DoRA's magnitude is refused: LoftQ's factors repair W - deq(Q(W)) additively."""
        if self.use_dora:
            raise ConfigError("LoftQ cannot be combined with use_dora=True here; use method 'loftq' or 'dora'")
