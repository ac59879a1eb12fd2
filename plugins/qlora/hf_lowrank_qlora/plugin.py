"""Hook implementations of the ``qlora`` method: LoRA on the core's 4-bit NF4 base."""

from __future__ import annotations

from peft import LoraConfig
from torch import nn

from hf_lowrank_lora import LORA_ALIASES, attach_lora
from hf_lowrank_plugins import MethodInfo, hookimpl
from hf_lowrank_plugins.quantization import prepare_for_training

from .config import QLoraConfig


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``qlora``: the core quantizes the base before ``init_adapter`` (``requires_quantized_base``)."""
    return [
        MethodInfo(
            name="qlora",
            config_class=QLoraConfig,
            summary="QLoRA: LoRA on a frozen 4-bit NF4 base with double quantization (bitsandbytes)",
            default_lr=2e-4,
            lr_reason="as LoRA; the QLoRA paper trains 7B-13B models at 2e-4",
            aliases=LORA_ALIASES,
            requires_quantized_base=True,
        )
    ]


@hookimpl
def init_adapter(model: nn.Module, config: LoraConfig) -> nn.Module:
    """LoRA layers on the (already quantized) base; PEFT dispatches to its bitsandbytes LoRA layers."""
    return attach_lora(prepare_for_training(model), config)
