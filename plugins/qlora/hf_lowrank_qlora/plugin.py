"""Hook implementations: the ``qlora`` method, and 4-bit quantization for every adapter method."""

from __future__ import annotations

from hf_lowrank_lora import attach_lora

from hf_lowrank_plugins import MethodInfo, hookimpl

from .config import QLoraConfig
from .quantize import dequantize_model, prepare_for_training, quantize_model


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``qlora``: the core quantizes the base (``quantize_base``) before ``init_adapter``."""
    return [
        MethodInfo(
            name="qlora",
            config_class=QLoraConfig,
            summary="QLoRA: LoRA on a frozen 4-bit NF4 base with double quantization (bitsandbytes)",
            requires_quantized_base=True,
        )
    ]


@hookimpl
def init_adapter(model, config):
    """LoRA layers on the (already quantized) base; PEFT dispatches to its bitsandbytes LoRA layers."""
    return attach_lora(prepare_for_training(model), config)


@hookimpl
def quantize_base(model, settings):
    """Serve ``load_in_4bit`` for any method (QDoRA, QPiSSA, ...)."""
    return quantize_model(model, settings)


@hookimpl
def dequantize_base(model):
    """Serve merging into a 16/32-bit checkpoint from a 4-bit base."""
    return dequantize_model(model)
