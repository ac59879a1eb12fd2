"""DoRA for hf-lowrank-plugins: ``attach(model, "dora", r=16)``."""

from importlib.metadata import version

from .config import DoraConfig
from .model import attach_dora, cache_for_inference, clear_dora_cache, fast_inference

__all__ = ["DoraConfig", "attach_dora", "cache_for_inference", "clear_dora_cache", "fast_inference"]
__version__ = version("hf-lowrank-dora")  # the version lives in pyproject.toml only
