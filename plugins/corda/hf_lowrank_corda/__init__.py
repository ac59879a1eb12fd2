"""CorDA for hf-lowrank-plugins: LoRA from the SVD of each weight times its inputs' covariance, at train start."""

from .config import CordaMethodConfig
from .model import attach_corda, initialise_corda

__all__ = ["CordaMethodConfig", "attach_corda", "initialise_corda"]
