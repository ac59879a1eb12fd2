"""Deliverables of a method whose trained base is not one a loader rebuilds from the original model.

SALOR trains on a pruned base; LoftQ with more than one alternation on NF4(W - s·B·A). An adapter
on the original (or on NF4(W)) would be another model, so the base is written beside it as a plain
checkpoint (``base/``, a 4-bit base dequantized) and the adapter names it as its base
(``base_model_name_or_path``): plain PEFT, ``hf-lowrank merge`` and serving stacks find the model
that was trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from hf_lowrank_plugins import ExportResult, IncompatibleError, atomic_directory, save_adapter, save_merged
from hf_lowrank_plugins.streaming import write_checkpoint


def save_base(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write the base under ``model``'s adapter as a plain transformers checkpoint (plus tokenizer),
    atomically; streamed tensor by tensor from the live model (a 4-bit base dequantized layer by
    layer), so no copy of the model is made."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        write_checkpoint(model, tmp, merge=False)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return directory


def save_adapter_on(model: nn.Module, directory: str | Path, base_dir: str | Path | None) -> Path:
    """Write ``model``'s adapter naming ``base_dir`` (where :func:`save_base` wrote, or will have moved
    to) as its base; ``None`` keeps the base it names."""
    if not isinstance(model, PeftModel):
        raise IncompatibleError(f"expected the PeftModel returned by attach(), got {type(model).__name__}")
    config = model.peft_config[model.active_adapter]
    previous = config.base_model_name_or_path
    if base_dir is not None:
        config.base_model_name_or_path = str(Path(base_dir).resolve())
    try:
        return save_adapter(model, directory)
    finally:
        config.base_model_name_or_path = previous


def export_with_base(
    model: nn.Module,
    output_dir: str | Path,
    merge: bool,
    tokenizer: Any = None,
    final_dir: str | Path | None = None,
    merged_dtype: torch.dtype | None = None,
) -> ExportResult:
    """``base/`` (:func:`save_base`), ``adapter/`` naming it, and with ``merge`` ``merged/``, under
    ``output_dir``. ``final_dir`` is where ``output_dir``'s contents will live (a staged export is moved
    there): the adapter names ``final_dir/base``."""
    output_dir = Path(output_dir)
    result = ExportResult()
    result.extra["base"] = save_base(model, output_dir / "base", tokenizer=tokenizer)
    result.adapter_dir = save_adapter_on(model, output_dir / "adapter", Path(final_dir or output_dir) / "base")
    if merge:
        result.merged_dir = save_merged(model, output_dir / "merged", tokenizer=tokenizer, dtype=merged_dtype)
    return result
