"""LoRA for hf-lowrank-plugins: ``attach(model, "lora", r=16)``."""

from .config import LoraMethodConfig
from .model import attach_lora

__all__ = ["LoraMethodConfig", "attach_lora"]
__version__ = "0.1.0"
