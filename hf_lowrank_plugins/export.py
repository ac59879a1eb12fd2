"""Default deliverables: a PEFT adapter directory and a merged plain transformers checkpoint.

These are what ``post_train_merge`` falls back to, and what plugins call after their own
conversion step (e.g. PiSSA rewriting its adapter relative to the original weights).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from peft import PeftModel
from torch import nn

from .errors import IncompatibleError
from .io import atomic_directory
from .registry import Registry, get_registry
from .types import ExportResult


def is_quantized(model: nn.Module) -> bool:
    """True when any layer of ``model`` (also inside a PEFT wrapper) holds packed low-bit weights."""
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt", "Params4bit") for m in model.modules()) or bool(
        getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    )


def save_adapter(model: PeftModel, directory: str | Path) -> Path:
    """Write ``model``'s adapter in PEFT format (``adapter_config.json`` + safetensors), atomically."""
    directory = Path(directory)
    if not isinstance(model, PeftModel):
        raise IncompatibleError(f"{type(model).__name__} carries no PEFT adapter to save; use save_merged instead")
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return directory


def merged_copy(model: nn.Module, registry: Registry | None = None, in_place: bool = False) -> nn.Module:
    """A plain full-precision transformers model equal to ``model`` with its adapters merged.

    A quantized base is first dequantized through the ``dequantize_base`` hook, so the merge is
    done in 16/32-bit (rounding the merged weights back to 4 bits would lose the adapter's update).
    """
    registry = registry or get_registry()
    work = model if in_place else copy.deepcopy(model)
    if is_quantized(work):
        dequantized = registry.pm.hook.dequantize_base(model=work)
        if dequantized is None:
            raise IncompatibleError(
                "the model has a 4-bit base but no installed plugin can dequantize it; "
                "install hf-lowrank-qlora (pip install -e plugins/qlora)"
            )
        work = dequantized
    if isinstance(work, PeftModel):
        work = work.merge_and_unload(safe_merge=True)
    return work


def write_merged(model: nn.Module, directory: str | Path, tokenizer: Any = None, registry: Registry | None = None,
                 in_place: bool = False) -> Path:
    """Write the merged checkpoint's files into the existing folder ``directory`` (not atomic on its own)."""
    merged = merged_copy(model, registry=registry, in_place=in_place)
    merged.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return Path(directory)


def save_merged(
    model: nn.Module,
    directory: str | Path,
    tokenizer: Any = None,
    registry: Registry | None = None,
    in_place: bool = False,
) -> Path:
    """Write a plain transformers checkpoint (plus ``tokenizer`` if given) with adapters merged in, atomically."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        write_merged(model, tmp, tokenizer=tokenizer, registry=registry, in_place=in_place)
    return directory


def default_export(
    model: nn.Module, output_dir: str | Path, merge: bool, tokenizer: Any = None, registry: Registry | None = None
) -> ExportResult:
    """``output_dir/adapter`` for a PEFT model, ``output_dir/merged`` when ``merge`` (or no adapter)."""
    output_dir = Path(output_dir)
    result = ExportResult()
    if isinstance(model, PeftModel):
        result.adapter_dir = save_adapter(model, output_dir / "adapter")
    if merge or not isinstance(model, PeftModel):
        result.merged_dir = save_merged(model, output_dir / "merged", tokenizer=tokenizer, registry=registry)
    return result
