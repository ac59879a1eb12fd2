"""What a method is: its declaration (:class:`MethodInfo`) and its configuration's fields.

A plugin declares what only it knows: the name, the config class, a default learning rate and the
reason for it, whether a 4-bit base can work (and why not), the highest DeepSpeed ZeRO stage it
can train under (and why not higher), whether FSDP can work (and why not), field aliases, and, on its config
class, each field's help text, choices and range (dataclass field ``metadata``). The core derives
the rest: which hooks the plugin implements (so whether it replaces the optimizer), and the help
and validation of every field from the annotations and metadata.

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
from typing import Any, Literal, Union

from peft import PeftConfig

from .errors import ConfigError

#: Hooks answered by the plugin owning a method (see :mod:`.hookspecs`).
METHOD_HOOKS = ("init_adapter", "init_adapter_from_data", "wrap_optimizer", "post_train_merge", "plan_memory")


@dataclass(frozen=True)
class MethodInfo:
    """What a plugin declares about one method (returned from ``describe_methods``).

    Attributes:
        name: the method name users type (``lora``, ``dora``, ...).
        config_class: its ``peft.PeftConfig`` subclass; ``config_class()`` must give sane defaults.
        summary: one line for ``hf-lowrank list``.
        default_lr: the learning rate ``compare`` uses when the user names none, and ``lr_reason``
            why (shown in ``comparison.md``). ``None``: the reference method's.
        reference: this method is the one others are compared against by default (LoRA).
        baseline: a reference point rather than a method to choose (full fine-tuning); ``compare``
            runs it last.
        aliases: common option names mapped to this method's fields (``{"rank": "r"}``), so
            ``--rank``/``--alpha`` work for every method that has such a setting.
        no_quantized_base: why this method cannot train on a 4-bit base; ``None`` when it can.
        requires_quantized_base: the core quantizes the base before ``init_adapter`` (QLoRA).
        quantizes_base_after_init: for a 4-bit run the core does not quantize first but passes the
            settings to ``init_adapter`` (QPiSSA must see full-precision W for its SVD).
        max_zero_stage: the highest DeepSpeed ZeRO stage the method can train under (3: all), and
            ``zero_reason`` why not higher; the core refuses a higher stage before training.
        no_fsdp: why this method cannot train under FSDP; ``None`` when it can.
        trains_adapter: whether the result is a PEFT adapter (``False`` for full-weight methods).
        identity_at_init: the adapted model's output equals the base model's right after attach
            (and after data-dependent init); the conformance kit checks it where declared.
        plain_peft_type: a plain PEFT adapter of this ``peft_type`` (``"LORA"``) is this method's
            when loaded with :func:`~hf_lowrank_plugins.load_adapter`.
        plugin_name, distribution, version: filled in by the registry.
        hooks: the method hooks its plugin implements, filled in by the registry from pluggy.
    """

    name: str
    config_class: type[PeftConfig]
    summary: str = ""
    default_lr: float | None = None
    lr_reason: str = ""
    reference: bool = False
    baseline: bool = False
    aliases: Mapping[str, str] = field(default_factory=dict)
    no_quantized_base: str | None = None
    requires_quantized_base: bool = False
    quantizes_base_after_init: bool = False
    max_zero_stage: int = 3
    zero_reason: str = ""
    no_fsdp: str | None = None
    trains_adapter: bool = True
    identity_at_init: bool = True
    plain_peft_type: str | None = None
    plugin_name: str = ""
    distribution: str = ""
    version: str = ""
    hooks: frozenset[str] = frozenset()

    @property
    def supports_quantized_base(self) -> bool:
        """Whether the method can train on a 4-bit base (it states no reason why not)."""
        return self.no_quantized_base is None

    @property
    def wraps_optimizer(self) -> bool:
        """Whether the method changes the Trainer's optimizer (its plugin implements ``wrap_optimizer``)."""
        return "wrap_optimizer" in self.hooks

    @property
    def needs_trainer_hooks(self) -> bool:
        """Whether training without ``adapted.trainer_kwargs()`` would silently run something else."""
        return bool({"wrap_optimizer", "init_adapter_from_data"} & self.hooks)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly description (used by ``hf-lowrank list --json``)."""
        return {
            "name": self.name,
            "summary": self.summary,
            "distribution": self.distribution,
            "version": self.version,
            "plugin": self.plugin_name,
            "config_class": f"{self.config_class.__module__}.{self.config_class.__qualname__}",
            "supports_quantized_base": self.supports_quantized_base,
            "no_quantized_base": self.no_quantized_base,
            "wraps_optimizer": self.wraps_optimizer,
            "max_zero_stage": self.max_zero_stage,
            "zero_reason": self.zero_reason or None,
            "no_fsdp": self.no_fsdp,
            "trains_adapter": self.trains_adapter,
            "default_lr": self.default_lr,
            "hooks": sorted(self.hooks),
        }


# ----------------------------------------------------------------------------- config fields


def peft_internal_fields() -> frozenset[str]:
    """Fields every ``PeftConfig`` has that describe the adapter's bookkeeping, not the method."""
    return frozenset(f.name for f in dataclasses.fields(PeftConfig)) | {"hf_lowrank_method", "runtime_config"}


def owned_fields() -> frozenset[str]:
    """Fields the library or PEFT sets (the method's name, PEFT's type and version, the base it names,
    inference mode): a user's value would be overwritten, ignored, or make an adapter nothing reads.
    ``task_type`` is not among them: it is inferred, but a user may name it."""
    return peft_internal_fields() - {"task_type"}


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
    internal = set() if include_internal else peft_internal_fields()
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
