"""PiSSA for hf-lowrank-plugins: ``attach(model, "pissa", r=16)``; QPiSSA with ``quantize_residual=True``."""

from .config import PissaConfig
from .convert import converted_lora_config, converted_lora_state_dict, save_portable_adapter
from .model import attach_pissa, initial_factors

__all__ = [
    "PissaConfig", "attach_pissa", "converted_lora_config", "converted_lora_state_dict", "initial_factors",
    "save_portable_adapter",
]
__version__ = "0.1.0"
