"""Hook implementations of the ``dora`` method."""

from __future__ import annotations

from peft import LoraConfig
from torch import nn

from hf_lowrank_lora import LORA_ALIASES
from hf_lowrank_plugins import MethodInfo, hookimpl

from .config import DoraConfig
from .model import attach_dora


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``dora``; it trains on a 4-bit base too (QDoRA, via ``load_in_4bit=True``)."""
    return [
        MethodInfo(
            name="dora",
            config_class=DoraConfig,
            summary="DoRA: magnitude m times direction (W + s*B@A)/||.||, norm detached (PEFT use_dora)",
            default_lr=2e-4,
            lr_reason="as LoRA: the DoRA paper keeps LoRA's hyperparameters",
            aliases=LORA_ALIASES,
        )
    ]


@hookimpl
def init_adapter(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Attach PEFT DoRA layers; output equals the base at init (B = 0 and m = ||W|| row-wise)."""
    return attach_dora(model, config)
