"""PiSSA for hf-lowrank-plugins: ``attach(model, "pissa", r=16)``; QPiSSA with ``load_in_4bit=True``.

The portable export (a rank-2r LoRA relative to the original weights) is shared with the other
residual methods and lives in :mod:`hf_lowrank_lora.residual`.
"""

from importlib.metadata import version

from .config import PissaConfig
from .model import attach_pissa

__all__ = ["PissaConfig", "attach_pissa"]
__version__ = version("hf-lowrank-pissa")  # the version lives in pyproject.toml only
