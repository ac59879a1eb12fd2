"""Hook implementations of the ``lora`` method."""

from __future__ import annotations

from peft import LoraConfig
from torch import nn

from hf_lowrank_plugins import MethodInfo, hookimpl

from .config import LORA_ALIASES, LoraMethodConfig
from .model import attach_lora


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``lora``."""
    return [
        MethodInfo(
            name="lora",
            config_class=LoraMethodConfig,
            summary="LoRA: W + s*B@A, B=0 at init (PEFT layers)",
            default_lr=2e-4,
            lr_reason="B starts at zero and the update is scaled by alpha/r, so adapters need about 10x full "
            "fine-tuning's rate; 2e-4 is the usual LoRA rate (QLoRA paper, PEFT examples)",
            reference=True,
            aliases=LORA_ALIASES,
            plain_peft_type="LORA",
        )
    ]


@hookimpl
def init_adapter(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Attach PEFT LoRA layers; output equals the base model at init because B = 0."""
    return attach_lora(model, config)
