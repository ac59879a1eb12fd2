"""hf-lowrank-plugins: low-rank fine-tuning methods as plugins for ``transformers.Trainer``.

The library knows no method. Methods come from installed plugins (entry-point group
``hf_lowrank_plugins``) that implement the hooks in :mod:`hf_lowrank_plugins.hookspecs`. The
``hf-lowrank`` application lives in :mod:`hf_lowrank_plugins.app` and is never imported from here.
"""

from importlib.metadata import PackageNotFoundError, version

from . import _import_notices  # noqa: F401 - first: before PEFT imports bitsandbytes
from .api import Adapted, attach, infer_task_type, load_adapter, load_config, make_config
from .callback import LowRankCallback
from .errors import ConfigError, IncompatibleError, LowRankError, PluginError, TargetError, UnknownMethodError
from .export import default_export, merged_copy, save_adapter, save_merged
from .hookspecs import hookimpl, hookspec
from .io import atomic_directory, write_json_atomic
from .method import MethodInfo, describe_fields, validate_config
from .outputs import OutputFolderError, OutputSet, verify_manifest
from .quantization import is_quantized
from .registry import Registry, get_registry, set_registry
from .targets import check_rank, find_target_modules
from .types import ExportResult, QuantizationSettings

try:
    __version__ = version("hf-lowrank-plugins")  # the version lives in pyproject.toml only
except PackageNotFoundError:  # pragma: no cover - imported from a source tree without installing
    __version__ = "0+unknown"


def list_methods() -> dict[str, MethodInfo]:
    """Installed methods by name."""
    return get_registry().methods


__all__ = [
    "Adapted",
    "ConfigError",
    "ExportResult",
    "IncompatibleError",
    "LowRankCallback",
    "LowRankError",
    "MethodInfo",
    "OutputFolderError",
    "OutputSet",
    "PluginError",
    "QuantizationSettings",
    "Registry",
    "TargetError",
    "UnknownMethodError",
    "attach",
    "atomic_directory",
    "check_rank",
    "default_export",
    "describe_fields",
    "find_target_modules",
    "get_registry",
    "hookimpl",
    "hookspec",
    "infer_task_type",
    "is_quantized",
    "list_methods",
    "load_adapter",
    "load_config",
    "make_config",
    "merged_copy",
    "save_adapter",
    "save_merged",
    "set_registry",
    "validate_config",
    "verify_manifest",
    "write_json_atomic",
]
