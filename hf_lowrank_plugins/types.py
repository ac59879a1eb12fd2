"""Plain data exchanged between the core and plugins: a method's declaration, quantization and plan
settings, and what an export wrote. It imports nothing of the library (the contract's ground floor)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    import os

    from peft import PeftConfig


class SavesPretrained(Protocol):
    """What the library asks of a tokenizer (or processor) it is given: to be written beside a checkpoint."""

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> Any:
        """Write its files into ``save_directory``."""
        ...


@dataclass(frozen=True)
class QuantizationSettings:
    """How to quantize a frozen base (the QLoRA recipe's defaults)."""

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    skip_modules: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: object) -> QuantizationSettings:
        """Settings from a config's ``bnb_4bit_*`` fields where it has them, defaults otherwise.

        ``bnb_4bit_compute_dtype="auto"`` means bfloat16 on a GPU and float32 on CPU, where bf16
        matmuls are slow and fp32 keeps exactness checks tight.
        """
        dtype = getattr(config, "bnb_4bit_compute_dtype", "auto")
        if dtype == "auto":
            dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        return cls(
            quant_type=getattr(config, "bnb_4bit_quant_type", cls.quant_type),
            double_quant=getattr(config, "bnb_4bit_use_double_quant", cls.double_quant),
            compute_dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype,
        )


@dataclass(frozen=True)
class PlanSettings:
    """The run being planned (``hf-lowrank plan``; a method's ``plan_memory`` hook reads it)."""

    batch_size: int = 2
    seq_len: int = 64
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False
    world_size: int = 1
    zero_stage: int = 0
    dtype: torch.dtype | None = None  #: the frozen base's dtype; None: the checkpoint's
    device: str = "cpu"  #: ``cpu`` (the process, libraries included) or ``cuda`` (the allocator)

    @property
    def tokens(self) -> int:
        """Tokens per micro-batch."""
        return self.batch_size * self.seq_len


@dataclass
class ExportResult:
    """What :meth:`Adapted.export` wrote: each deliverable's directory, plus free-form notes."""

    adapter_dir: Path | None = None
    merged_dir: Path | None = None
    extra: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def paths(self) -> dict[str, str]:
        """All written directories by role, as strings (for JSON)."""
        out = {"adapter": self.adapter_dir, "merged": self.merged_dir, **self.extra}
        return {k: str(v) for k, v in out.items() if v is not None}

    def relocated(self, old_root: Path, new_root: Path) -> ExportResult:
        """The same result with every path under ``old_root`` moved to ``new_root`` (after a staged write)."""

        def move(path: Path | None) -> Path | None:
            if path is None:
                return None
            path = Path(path)
            return new_root / path.relative_to(old_root) if path.is_relative_to(old_root) else path

        return ExportResult(
            adapter_dir=move(self.adapter_dir),
            merged_dir=move(self.merged_dir),
            extra={k: move(v) for k, v in self.extra.items()},  # type: ignore[misc]
            notes=list(self.notes),
        )


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
        hooks: the method hooks its plugin implements, filled in by the registry from pluggy, and
            ``trainer_hooks`` those of them that run inside the Trainer (:data:`.hookspecs.HOOKS`).
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
    trainer_hooks: frozenset[str] = frozenset()

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
        return bool(self.trainer_hooks)

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
