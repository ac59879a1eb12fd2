"""GaLore for hf-lowrank-plugins: ``attach(model, "galore", rank=128, update_proj_gap=200)``."""

from importlib.metadata import version

from .adafactor import GaLoreAdafactor
from .config import GaLoreConfig
from .optimizer import GaLoreAdamW, GaLoreOptimizer
from .projector import compute_projection, project, project_back, projection_side

__all__ = [
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreConfig",
    "GaLoreOptimizer",
    "compute_projection",
    "project",
    "project_back",
    "projection_side",
]
__version__ = version("hf-lowrank-galore")  # the version lives in pyproject.toml only
