"""Adam-mini for hf-lowrank-plugins: full fine-tuning with one second-moment value per parameter block."""

from .config import AdamMiniConfig
from .optimizer import build_adam_mini, state_bytes

__all__ = ["AdamMiniConfig", "build_adam_mini", "state_bytes"]
