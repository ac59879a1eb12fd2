"""hf-lowrank-plugins: low-rank fine-tuning methods as plugins for ``transformers.Trainer``.

The library knows no method. Methods come from installed plugins (entry-point group
``hf_lowrank_plugins``) that implement the hooks in :mod:`hf_lowrank_plugins.hookspecs`. The
``hf-lowrank`` application lives in :mod:`hf_lowrank_plugins.app` and is never imported from here.

The names below are imported on first use (PEP 562), so that importing the package, and with it
``hf-lowrank --help``, costs no torch, transformers or PEFT import; ``from hf_lowrank_plugins import
attach`` works as with eager imports.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from . import _import_notices  # noqa: F401 - first: before PEFT imports bitsandbytes

if TYPE_CHECKING:
    from .api import Adapted, attach, infer_task_type, make_config
    from .callback import LowRankCallback
    from .errors import ConfigError, IncompatibleError, LowRankError, PluginError, TargetError, UnknownMethodError
    from .export import default_export, merged_copy, save_adapter, save_merged
    from .hookspecs import hookimpl, hookspec
    from .io import atomic_directory, write_json_atomic
    from .loading import load_adapter, load_config
    from .merge import merge_adapter
    from .method import MethodConfig, QuantizationFields, describe_fields, validate_config
    from .outputs import OutputFolderError, OutputSet, verify_manifest
    from .quantization import is_quantized
    from .registry import Registry, get_registry, set_registry
    from .targets import check_rank, find_target_modules
    from .types import ExportResult, MethodInfo, PlanSettings, QuantizationSettings

#: Public name -> the module that defines it (the imports above, for type checkers, say the same).
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["Adapted", "attach", "infer_task_type", "make_config"], "api"),
    **dict.fromkeys(["load_adapter", "load_config"], "loading"),
    "LowRankCallback": "callback",
    **dict.fromkeys(
        ["ConfigError", "IncompatibleError", "LowRankError", "PluginError", "TargetError", "UnknownMethodError"],
        "errors",
    ),
    **dict.fromkeys(["default_export", "merged_copy", "save_adapter", "save_merged"], "export"),
    **dict.fromkeys(["hookimpl", "hookspec"], "hookspecs"),
    **dict.fromkeys(["atomic_directory", "write_json_atomic"], "io"),
    "merge_adapter": "merge",
    **dict.fromkeys(["MethodConfig", "QuantizationFields", "describe_fields", "validate_config"], "method"),
    **dict.fromkeys(["OutputFolderError", "OutputSet", "verify_manifest"], "outputs"),
    "is_quantized": "quantization",
    **dict.fromkeys(["Registry", "get_registry", "set_registry"], "registry"),
    **dict.fromkeys(["check_rank", "find_target_modules"], "targets"),
    **dict.fromkeys(["ExportResult", "MethodInfo", "PlanSettings", "QuantizationSettings"], "types"),
}

try:
    __version__ = version("hf-lowrank-plugins")  # the version lives in pyproject.toml only
except PackageNotFoundError:  # pragma: no cover - imported from a source tree without installing
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
