"""A method's configuration fields: their help, their validation, and which of them the library owns.

A plugin declares what only it knows in :class:`~hf_lowrank_plugins.types.MethodInfo` (the name,
the config class, a default learning rate and the reason for it, what it cannot train on and why,
field aliases) and, on its config class, each field's help text, choices and range (dataclass field
``metadata``). The core derives the rest: which hooks the plugin implements (so whether it replaces
the optimizer), and the help and validation of every field from the annotations and metadata.

Field metadata keys: ``help`` (one line), ``choices`` (allowed values), ``min`` / ``max``
(inclusive bounds), ``min_exclusive`` / ``max_exclusive``, ``finite`` (no infinity). :func:`validate_config` checks every
field against its type annotation and these keys and raises
:class:`~hf_lowrank_plugins.errors.ConfigError` naming the field, the value and what is allowed;
config classes call it from ``__post_init__`` so the Python API and the CLI fail alike.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union

from .errors import ConfigError

if TYPE_CHECKING:
    from peft import PeftConfig


# ----------------------------------------------------------------------------- config fields


@dataclass
class MethodConfig:
    """The core's part of every method's config class: mix it in beside the PEFT config it extends
    (``class DoraConfig(LoraConfig, MethodConfig)``, ``class GaLoreConfig(PeftConfig, MethodConfig)``).

    ``hf_lowrank_method`` names the method the config belongs to. A plugin does not set it: the core
    fills it in from the method's declaration (:attr:`MethodInfo.name <hf_lowrank_plugins.types.MethodInfo>`)
    when it makes the config, attaches it or loads it back, and PEFT saves it with every Trainer
    checkpoint's ``adapter_config.json``, so a checkpoint loads back as its method's class (an
    exported adapter keeps it in ``hf_lowrank_method.json`` instead, for plain PEFT).
    """

    hf_lowrank_method: str = field(
        default="",
        metadata={"help": "the method this config belongs to, filled in by hf-lowrank from the method's declaration"},
    )


@dataclass
class QuantizationFields:
    """The 4-bit base's settings as config fields, for a method that always trains on one (QLoRA, LoftQ):
    mix it in beside :class:`MethodConfig`. :meth:`QuantizationSettings.from_config
    <hf_lowrank_plugins.types.QuantizationSettings.from_config>` reads them; defaults follow the QLoRA
    paper. Plain PEFT drops them when loading the adapter, which is right: they describe the base."""

    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type of the base"})
    bnb_4bit_use_double_quant: bool = field(default=True, metadata={"help": "quantize the quantization constants too"})
    bnb_4bit_compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "dtype 4-bit matmuls dequantize to; auto: bfloat16 on a GPU, float32 on CPU"}
    )


def name_config(config: object, method_name: str) -> None:
    """Record ``method_name`` in ``config`` (a :class:`MethodConfig`; plain PEFT configs carry no name)."""
    if isinstance(config, MethodConfig):
        config.hf_lowrank_method = method_name


def peft_internal_fields() -> frozenset[str]:
    """Fields every ``PeftConfig`` has that describe the adapter's bookkeeping, not the method."""
    from peft import PeftConfig

    own = {f.name for f in dataclasses.fields(MethodConfig)}
    return frozenset(f.name for f in dataclasses.fields(PeftConfig)) | own | {"runtime_config"}


def owned_fields() -> frozenset[str]:
    """Fields the library or PEFT sets (the method's name, PEFT's type and version, the base it names,
    inference mode): a user's value would be overwritten, ignored, or make an adapter nothing reads.
    ``task_type`` is not among them: it is inferred, but a user may name it."""
    return peft_internal_fields() - {"task_type"}


def default_init_fields(config_class: type[PeftConfig]) -> dict[str, bool]:
    """PEFT's default initialisation of a tuner, whatever the tuner calls it (``init_lora_weights``,
    ``init_ia3_weights``, ``init_weights``): every ``init_*`` switch at its class default. What a layer
    built without data, or re-built under saved weights, must use: no SVD, no calibration, no base rewrite."""
    return {
        f.name: f.default
        for f in dataclasses.fields(config_class)
        if f.name.startswith("init_") and isinstance(f.default, bool)
    }


def derived_fields(config_class: type[PeftConfig]) -> dict[str, str]:
    """Fields a method's config computes from its other fields, with what from (the config class's
    ``DERIVED_FIELDS``): a value given for one would be overwritten, so it is refused instead."""
    return dict(getattr(config_class, "DERIVED_FIELDS", {}))


def config_fields(config_class: type[PeftConfig]) -> dict[str, dataclasses.Field]:
    """The settable fields of a method's config class (every ``__init__`` field)."""
    return {f.name: f for f in dataclasses.fields(config_class) if f.init}


@dataclass(frozen=True)
class FieldDoc:
    """One user-facing setting of a method: name, type, default, help, allowed values."""

    name: str
    type: str
    default: Any
    help: str
    allowed: str = ""


def _type_text(annotation: Any) -> str:
    """``int``, ``str | None``, ``'exact' | 'fast'``: an annotation as a user reads it."""
    if isinstance(annotation, str):
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [_type_text(a) for a in args if a is not type(None)]
        return " | ".join(parts + (["None"] if type(None) in args else []))
    if origin is not None:
        inner = ", ".join(_type_text(a) for a in args if a is not Ellipsis)
        return (
            f"{getattr(origin, '__name__', str(origin))}[{inner}]"
            if inner
            else getattr(origin, "__name__", str(origin))
        )
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _allowed(meta: Mapping[str, Any]) -> str:
    parts = []
    if "choices" in meta:
        parts.append("one of " + ", ".join(map(str, meta["choices"])))
    lo = (
        ("> " + str(meta["min_exclusive"]))
        if "min_exclusive" in meta
        else (">= " + str(meta["min"]))
        if "min" in meta
        else ""
    )
    hi = (
        ("< " + str(meta["max_exclusive"]))
        if "max_exclusive" in meta
        else ("<= " + str(meta["max"]))
        if "max" in meta
        else ""
    )
    parts += [p for p in (lo, hi) if p]
    return ", ".join(parts)


def describe_fields(config_class: type[PeftConfig], include_internal: bool = False) -> list[FieldDoc]:
    """Every user-facing field of ``config_class`` with its type, default and help (PEFT's or ours)."""
    hints = _hints(config_class)
    internal = set() if include_internal else peft_internal_fields() | set(derived_fields(config_class))
    docs = []
    for name, f in config_fields(config_class).items():
        if name in internal:
            continue
        meta = dict(f.metadata)
        help_text = " ".join(str(meta.get("help", "")).split())
        docs.append(FieldDoc(name, _type_text(hints.get(name, f.type)), _default(f), help_text, _allowed(meta)))
    return docs


def _hints(config_class: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(config_class)
    except Exception:  # an annotation that cannot be resolved: skip type checks, never crash
        return {}


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits ``annotation`` (the subset of typing used by config dataclasses)."""
    if annotation is Any or annotation is object:
        return True
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, set, frozenset) or annotation in (list, tuple, set):
        container = origin or annotation
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return isinstance(value, (list, tuple, set, frozenset) if container is not str else str) and (
            not args or all(_matches(v, args[0]) for v in value)
        )
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # forward references and exotic types: not ours to judge


def _range_problem(value: Any, meta: Mapping[str, Any]) -> str | None:
    if "choices" in meta and value not in meta["choices"]:
        return f"must be one of {', '.join(map(repr, meta['choices']))}"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isnan(value):
        return "must be a number"
    if meta.get("finite") and isinstance(value, float) and math.isinf(value):
        return "must be a finite number"
    if "min" in meta and value < meta["min"]:
        return f"must be >= {meta['min']}"
    if "min_exclusive" in meta and value <= meta["min_exclusive"]:
        return f"must be > {meta['min_exclusive']}"
    if "max" in meta and value > meta["max"]:
        return f"must be <= {meta['max']}"
    if "max_exclusive" in meta and value >= meta["max_exclusive"]:
        return f"must be < {meta['max_exclusive']}"
    return None


def validate_config(
    config: Any,
    limits: Mapping[str, Mapping[str, Any]] | None = None,
    skip: tuple[str, ...] = (),
    flags: bool = False,
) -> None:
    """Check every field of ``config`` against its annotation and its metadata (or ``limits``).

    ``limits`` adds metadata for inherited fields the class cannot annotate itself (PEFT's ``r``,
    ``lora_dropout``, ...); fields in ``skip`` and PEFT's bookkeeping fields are not checked. With
    ``flags`` the message names the command-line option (``--max-steps``) instead of the field. Raises :class:`ConfigError` for the first bad field, naming the field,
    the value, what is allowed and the config class.
    """
    hints = _hints(type(config))
    unchecked = set(skip) | peft_internal_fields()
    owner = "" if flags else f" ({type(config).__name__})"

    def label(name: str) -> str:
        return "--" + name.replace("_", "-") if flags else name

    for name, f in config_fields(type(config)).items():
        if name in unchecked:
            continue
        value = getattr(config, name)
        meta = {**dict(f.metadata), **dict((limits or {}).get(name, {}))}
        annotation = hints.get(name)
        if annotation is not None and not _matches(value, annotation):
            expected = _type_text(annotation)
            if "'" in expected:  # a Literal: name the choices
                expected = "one of " + expected.replace(" | ", ", ")
            raise ConfigError(f"{label(name)} must be {expected}, got {value!r}{owner}")
        problem = _range_problem(value, meta)
        if problem:
            raise ConfigError(f"{label(name)} {problem}, got {value!r}{owner}")
