"""LoRA for hf-lowrank-plugins: ``attach(model, "lora", r=16)``."""

from .config import LoraMethodConfig
from .model import attach_lora, attach_lora_with_factors

__all__ = ["LoraMethodConfig", "attach_lora", "attach_lora_with_factors"]
__version__ = "0.1.0"
