"""LoRA for hf-lowrank-plugins: ``attach(model, "lora", r=16)``."""

from importlib.metadata import version

from .config import LORA_ALIASES, LoraMethodConfig, peft_meta
from .model import attach_lora

__all__ = ["LORA_ALIASES", "LoraMethodConfig", "attach_lora", "peft_meta"]
__version__ = version("hf-lowrank-lora")  # the version lives in pyproject.toml only
