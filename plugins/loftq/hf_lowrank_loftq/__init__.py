"""LoftQ for hf-lowrank-plugins: QLoRA whose adapter starts as the best rank-r repair of what 4-bit loses."""

from .config import LoftqConfig
from .model import attach_loftq

__all__ = ["LoftqConfig", "attach_loftq"]
