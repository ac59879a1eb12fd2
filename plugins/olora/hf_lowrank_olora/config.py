"""OLoRA's config: a ``LoraConfig`` whose ``init_lora_weights`` is PEFT's ``"olora"``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hf_lowrank_lora import LoraMethodConfig
from hf_lowrank_plugins import ConfigError


@dataclass
class OloraConfig(LoraMethodConfig):
    """OLoRA: B = Q[:, :r], A = R[:r] from the QR decomposition W = QR, frozen base W_res = W - s*B@A.

    Every LoRA option applies. ``init_lora_weights`` is ``"olora"`` (PEFT's initialisation) and is
    not set by hand; DoRA's magnitude is refused (the export to a plain LoRA on W is exact without it).
    """

    BASE_KEEPING_INITS: ClassVar[tuple[bool | str, ...]] = (True,)
    OWN_INITS: ClassVar[tuple[str, ...]] = ("olora",)
    OTHER_INITS_REFUSED: ClassVar[str] = "OLoRA initialises the adapter from the QR decomposition itself"

    def __post_init__(self) -> None:
        if self.use_dora:
            raise ConfigError("OLoRA cannot be combined with use_dora=True here; use method 'dora' or 'olora'")
        self._check_init()  # before it is set, so another init is refused rather than dropped
        self.init_lora_weights = "olora"
        super().__post_init__()
