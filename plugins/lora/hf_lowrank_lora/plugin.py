"""Hook implementations of the ``lora`` method."""

from __future__ import annotations

from hf_lowrank_plugins import MethodInfo, hookimpl

from .config import LoraMethodConfig
from .model import attach_lora


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``lora``."""
    return [MethodInfo(name="lora", config_class=LoraMethodConfig, summary="LoRA: W + s*B@A, B=0 at init (PEFT layers)")]


@hookimpl
def init_adapter(model, config):
    """Attach PEFT LoRA layers; output equals the base model at init because B = 0."""
    return attach_lora(model, config)
