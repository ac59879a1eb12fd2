"""OLoRA for hf-lowrank-plugins: LoRA initialised from the QR decomposition of each target weight."""

from .config import OloraConfig
from .model import attach_olora

__all__ = ["OloraConfig", "attach_olora"]
