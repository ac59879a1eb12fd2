"""DoRA for hf-lowrank-plugins: ``attach(model, "dora", r=16)``."""

from .config import DoraConfig
from .model import attach_dora, cache_for_inference, clear_dora_cache, fast_inference

__all__ = ["DoraConfig", "attach_dora", "cache_for_inference", "clear_dora_cache", "fast_inference"]
__version__ = "0.1.0"
