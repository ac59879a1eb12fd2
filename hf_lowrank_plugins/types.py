"""Plain data exchanged between the core and plugins."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


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
