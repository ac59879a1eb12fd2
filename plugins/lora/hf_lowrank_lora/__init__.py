"""LoRA for hf-lowrank-plugins: ``attach(model, "lora", r=16)``."""

from importlib.metadata import version

from .config import LORA_ALIASES, LoraMethodConfig, peft_meta
from .model import LoraModule, attach_lora, lora_layers

__all__ = ["LORA_ALIASES", "LoraMethodConfig", "LoraModule", "attach_lora", "lora_layers", "peft_meta"]
__version__ = version("hf-lowrank-lora")  # the version lives in pyproject.toml only
