"""Default deliverables: a PEFT adapter directory and a merged plain transformers checkpoint.

These are what ``post_train_merge`` falls back to, and what plugins call after their own
conversion step (e.g. PiSSA rewriting its adapter relative to the original weights).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from torch import nn

from .errors import IncompatibleError
from .io import atomic_directory
from .quantization import dequantize_model, is_quantized
from .streaming import DEFAULT_MAX_SHARD_SIZE, CheckpointReader, write_checkpoint
from .types import ExportResult, SavesPretrained

#: Beside ``adapter_config.json``: our method's name and every setting PEFT's own class does not know.
METHOD_SETTINGS_FILE = "hf_lowrank_method.json"


def peft_config_class(config: PeftConfig) -> type[PeftConfig]:
    """The PEFT class a method's config extends (``LoraConfig`` for the LoRA family): what plain PEFT loads."""
    return next(c for c in type(config).__mro__ if c.__module__.startswith("peft.") and issubclass(c, PeftConfig))


def split_adapter_config(directory: str | Path, config: PeftConfig) -> None:
    """Keep only PEFT's own fields in ``directory/adapter_config.json``; move ours to :data:`METHOD_SETTINGS_FILE`.

    Plain PEFT then loads the adapter without "unexpected keyword arguments" warnings, and
    :func:`~hf_lowrank_plugins.load_config` still rebuilds the method's own config class.
    """
    path = Path(directory) / "adapter_config.json"
    raw = json.loads(path.read_text())
    accepted = {f.name for f in dataclasses.fields(peft_config_class(config))}
    ours = {k: v for k, v in raw.items() if k not in accepted}
    method = getattr(config, "hf_lowrank_method", None)
    path.write_text(json.dumps({k: v for k, v in raw.items() if k in accepted}, indent=2, sort_keys=True) + "\n")
    if method:
        ours.pop("hf_lowrank_method", None)
        settings = {
            "tool": "hf-lowrank-plugins",
            "method": method,
            "config_class": type(config).__qualname__,
            "settings": ours,
        }
        (Path(directory) / METHOD_SETTINGS_FILE).write_text(
            json.dumps(settings, indent=2, sort_keys=True, default=str) + "\n"
        )


def save_adapter(model: PeftModel, directory: str | Path) -> Path:
    """Write ``model``'s adapter in PEFT format (``adapter_config.json`` + safetensors), atomically.

    ``adapter_config.json`` holds only what PEFT's own config class accepts (see
    :func:`split_adapter_config`).
    """
    directory = Path(directory)
    if not isinstance(model, PeftModel):
        raise IncompatibleError(f"{type(model).__name__} carries no PEFT adapter to save; use save_merged instead")
    with atomic_directory(directory) as tmp:
        # only the trained adapter: a trainer may have added others (TRL's DPO keeps a frozen "ref" copy)
        model.save_pretrained(str(tmp), safe_serialization=True, selected_adapters=[model.active_adapter])
        split_adapter_config(tmp, model.peft_config[model.active_adapter])
    return directory


def merged_copy(model: nn.Module, in_place: bool = False) -> nn.Module:
    """A plain full-precision transformers model equal to ``model`` with its adapters merged.

    A quantized base is first dequantized (:func:`~hf_lowrank_plugins.quantization.dequantize_model`),
    so the merge is done in 16/32-bit (rounding the merged weights back to 4 bits would lose the
    adapter's update).
    """
    work = model if in_place else copy.deepcopy(model)
    if is_quantized(work):
        work = dequantize_model(work)
    if isinstance(work, PeftModel):
        work = work.merge_and_unload(safe_merge=True)
    return work


def write_merged(
    model: nn.Module,
    directory: str | Path,
    tokenizer: SavesPretrained | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    source: CheckpointReader | None = None,
) -> Path:
    """Write the merged checkpoint's files into the folder ``directory`` (not atomic on its own).

    Streamed tensor by tensor (:func:`~hf_lowrank_plugins.streaming.write_checkpoint`): the merged
    model is never built, so the extra memory is one layer. ``dtype`` casts the saved
    floating-point tensors (and the config's ``dtype``); ``None`` keeps each tensor's own. The live
    model is left as it was. ``source``: the base checkpoint, when ``model`` is a meta-device
    skeleton (:func:`~hf_lowrank_plugins.plan.meta_model`) whose only real tensors are the adapter
    that :func:`~hf_lowrank_plugins.load_adapter` put on it: each base tensor is then read from
    disk when written, so a model larger than memory merges with one layer in memory.
    """
    write_checkpoint(model, directory, merge=True, dtype=dtype, max_shard_size=max_shard_size, source=source)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return Path(directory)


def save_merged(
    model: nn.Module,
    directory: str | Path,
    tokenizer: SavesPretrained | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write a plain transformers checkpoint (plus ``tokenizer`` if given) with adapters merged in, atomically.

    ``dtype``: the dtype of the saved weights (``None``: the merged model's own, which is the base's
    when it was loaded at its checkpoint's dtype). Extra memory: one layer (see :func:`write_merged`).
    """
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        write_merged(model, tmp, tokenizer=tokenizer, dtype=dtype, max_shard_size=max_shard_size)
    return directory


def default_export(
    model: nn.Module,
    output_dir: str | Path,
    merge: bool,
    tokenizer: SavesPretrained | None = None,
    merged_dtype: torch.dtype | None = None,
) -> ExportResult:
    """``output_dir/adapter`` for a PEFT model, ``output_dir/merged`` when ``merge``; a model that trained
    its weights themselves (full fine-tuning, GaLore) has no adapter, so ``merged/`` is always written,
    in place (the model is its own merge: no copy doubles peak memory)."""
    output_dir = Path(output_dir)
    result = ExportResult()
    if isinstance(model, PeftModel):
        result.adapter_dir = save_adapter(model, output_dir / "adapter")
    if merge or not isinstance(model, PeftModel):
        result.merged_dir = save_merged(model, output_dir / "merged", tokenizer=tokenizer, dtype=merged_dtype)
    if not merge and not isinstance(model, PeftModel):
        result.notes.append(
            "the weights themselves were trained: wrote the checkpoint to merged/ (there is no adapter)"
        )
    return result
