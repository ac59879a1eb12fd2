"""LoRA's config: PEFT's ``LoraConfig`` with our defaults, checked field by field on construction."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from peft import LoraConfig

from hf_lowrank_plugins import validate_config

#: ``--rank`` / ``--alpha`` (and ``rank=`` / ``alpha=`` in Python) for every LoRA-family method.
LORA_ALIASES = {"rank": "r", "alpha": "lora_alpha"}


def peft_meta(name: str, **extra: Any) -> dict[str, Any]:
    """PEFT's own metadata (help text, variant tags) of a ``LoraConfig`` field a subclass redeclares,
    with ``extra`` keys (``help``, ``min``, ``choices``, ...) added or replaced."""
    return {**next(f.metadata for f in fields(LoraConfig) if f.name == name), **extra}


@dataclass
class LoraMethodConfig(LoraConfig):
    """``peft.LoraConfig`` with ``target_modules="all-linear"`` by default (works for any model).

    Every field is checked against its type and range when the config is built (``r=4.5``,
    ``lora_dropout="abc"`` or ``lora_dropout=1.5`` raise :class:`~hf_lowrank_plugins.ConfigError`),
    so the Python API and ``--set`` fail alike. ``hf_lowrank_method`` names the method so the
    adapter loads back as this class when the plugin is installed. All PEFT options apply: ``r``,
    ``lora_alpha``, ``use_rslora``, ``lora_dropout``, ``target_modules`` (names, regex,
    ``"all-linear"``), ``exclude_modules``, ``bias``, ...
    """

    target_modules: list[str] | str | None = field(default="all-linear", metadata=peft_meta("target_modules"))
    # PEFT annotates int, but any positive real works (s = alpha / r); `--alpha 16` arrives as a float
    lora_alpha: int | float = field(default=8, metadata=peft_meta("lora_alpha"))  # type: ignore[assignment]
    hf_lowrank_method: str = "lora"

    #: Ranges of inherited PEFT fields, which carry no such metadata of their own.
    FIELD_LIMITS: ClassVar[dict[str, dict[str, Any]]] = {
        "r": {"min": 1},
        "lora_alpha": {"min_exclusive": 0},
        "lora_dropout": {"min": 0, "max_exclusive": 1},
    }
    #: Fields PEFT validates itself, with values its annotation cannot express (``"pissa_niter_16"``).
    UNCHECKED_FIELDS: ClassVar[tuple[str, ...]] = ("init_lora_weights",)

    def __post_init__(self) -> None:
        validate_config(self, limits=self.FIELD_LIMITS, skip=self.UNCHECKED_FIELDS)
        self.check()
        super().__post_init__()

    def check(self) -> None:
        """Method-specific checks, run after every field's type and range was checked; extend in subclasses.

        Raise :class:`~hf_lowrank_plugins.ConfigError` naming the setting and the fix.
        """
