"""LoRA for hf-lowrank-plugins: ``attach(model, "lora", r=16)``."""

from importlib.metadata import version

from .config import LORA_ALIASES, LoraMethodConfig, peft_meta
from .fused_add import (
    FusedAddLoraVariant,
    FusedLoraLinear,
    LoraLinearFunction,
    add_scaled_lora,
    has_hooks,
    lora_linear_backward,
    lora_linear_forward,
    unflatten_output,
    use_fused_add,
    use_peft_layer_call,
    without_autocast,
)
from .model import LoraModule, attach_lora, lora_layers

__all__ = [
    "LORA_ALIASES",
    "FusedAddLoraVariant",
    "FusedLoraLinear",
    "LoraLinearFunction",
    "LoraMethodConfig",
    "LoraModule",
    "add_scaled_lora",
    "attach_lora",
    "has_hooks",
    "lora_layers",
    "lora_linear_backward",
    "lora_linear_forward",
    "peft_meta",
    "unflatten_output",
    "use_fused_add",
    "use_peft_layer_call",
    "without_autocast",
]
__version__ = version("hf-lowrank-lora")  # the version lives in pyproject.toml only
