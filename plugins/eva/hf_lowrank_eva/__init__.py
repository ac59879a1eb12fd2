"""EVA for hf-lowrank-plugins: LoRA's A from the SVD of each layer's inputs, ranks given where variance is."""

from .config import EvaMethodConfig
from .model import attach_eva, initialise_eva

__all__ = ["EvaMethodConfig", "attach_eva", "initialise_eva"]
