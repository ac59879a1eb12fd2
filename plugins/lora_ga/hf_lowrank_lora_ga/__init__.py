"""LoRA-GA for hf-lowrank-plugins: ``attach(model, "lora_ga", r=16)``, then ``trainer.train()``.

The gradient estimate runs inside the Trainer (its ``on_train_begin`` hook, fresh runs only) on the
Trainer's own training batches; see :mod:`.gradient` for how it stays at LoRA's memory.
"""

from importlib.metadata import version

from .accumulators import GradientFactors
from .config import LoraGaConfig
from .gradient import estimate_gradient_factors
from .init import lora_ga_factors

__all__ = ["GradientFactors", "LoraGaConfig", "estimate_gradient_factors", "lora_ga_factors"]
__version__ = version("hf-lowrank-lora-ga")  # the version lives in pyproject.toml only
