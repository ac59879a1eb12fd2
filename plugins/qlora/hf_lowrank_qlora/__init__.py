"""QLoRA for hf-lowrank-plugins: ``attach(model, "qlora")`` or ``attach(model, "<method>", load_in_4bit=True)``."""

from .config import QLoraConfig
from .quantize import bnb_config, dequantize_model, quantize_model

__all__ = ["QLoraConfig", "bnb_config", "dequantize_model", "quantize_model"]
__version__ = "0.1.0"
