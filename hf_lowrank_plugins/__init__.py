"""hf-lowrank-plugins: low-rank fine-tuning methods as plugins for ``transformers.Trainer``.

The core knows no method. Methods come from installed plugins (entry-point group
``hf_lowrank_plugins``) that implement the hooks in :mod:`hf_lowrank_plugins.hookspecs`.
"""

from .api import Adapted, attach, infer_task_type, load_adapter, load_config, make_config
from .callback import LowRankCallback
from .errors import ConfigError, IncompatibleError, LowRankError, TargetError, UnknownMethodError
from .export import default_export, is_quantized, merged_copy, save_adapter, save_merged
from .hookspecs import hookimpl, hookspec
from .io import atomic_directory, write_json_atomic
from .registry import MethodInfo, Registry, get_registry, set_registry
from .targets import check_rank, find_target_modules
from .types import ExportResult, QuantizationSettings

__version__ = "0.1.0"


def list_methods() -> dict[str, MethodInfo]:
    """Installed methods by name."""
    return get_registry().methods


__all__ = [
    "Adapted", "ConfigError", "ExportResult", "IncompatibleError", "LowRankCallback", "LowRankError",
    "MethodInfo", "QuantizationSettings", "Registry", "TargetError", "UnknownMethodError", "attach",
    "atomic_directory", "check_rank", "default_export", "find_target_modules", "get_registry", "hookimpl",
    "hookspec", "infer_task_type", "is_quantized", "list_methods", "load_adapter", "load_config",
    "make_config", "merged_copy", "save_adapter", "save_merged", "set_registry", "write_json_atomic",
]
