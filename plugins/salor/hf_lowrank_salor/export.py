"""SALOR's deliverables: portable (pruned base + standard LoRA) and compressed (bitmap base + LoRA).

The trained model is ``W_s + s*B@A`` where ``W_s = prune(W)`` differs from W by a full-rank E, so
it is NOT a LoRA on the original weights (unlike PiSSA). The portable form is therefore the pruned
base as a plain transformers checkpoint plus a standard PEFT LoRA relative to it::

    out/base/        plain transformers checkpoint of W_s (zeros included), tokenizer
    out/adapter/     standard LoRA (PEFT format); base_model_name_or_path points at out/base
    out/compressed/  base.safetensors (bitmap-encoded sparse matrices) + config + adapter/
    out/merged/      (merge=True) plain checkpoint of W_s + s*B@A
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import PeftModel
from torch import nn
from transformers import AutoConfig

from hf_lowrank_lora.stored_base import export_with_base, save_adapter_on, save_base
from hf_lowrank_plugins import (
    ExportResult,
    IncompatibleError,
    atomic_directory,
    is_quantized,
    write_json_atomic,
)
from hf_lowrank_plugins.quantization import dequantize_model
from hf_lowrank_plugins.streaming import LazyStateDict, checkpoint_tensors, plain_config, plain_model

from .bitmap import load_compressed, save_compressed
from .model import apply_adapter_masks

COMPRESSED_FILE = "base.safetensors"


def pruned_base_copy(model: nn.Module) -> nn.Module:
    """A copy of the frozen (pruned) base of ``model`` without adapters, in full precision.

    A 4-bit base is dequantized by the core's quantization service (NF4's zero decodes to exactly 0,
    so the sparsity pattern is kept).
    """
    work = copy.deepcopy(model)
    if is_quantized(work):
        work = dequantize_model(work)
    if isinstance(work, PeftModel):
        work = work.unload()
    return work


def save_pruned_base(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write the pruned base of ``model`` as a plain transformers checkpoint (plus tokenizer), atomically
    (:func:`hf_lowrank_lora.stored_base.save_base`: streamed, a 4-bit base dequantized layer by layer)."""
    return save_base(model, directory, tokenizer=tokenizer)


def save_salor_adapter(
    model: nn.Module, directory: str | Path, base_dir: str | Path | None = None, adapter: str = "default"
) -> Path:
    """Write the adapter in PEFT format after re-zeroing masked factor entries.

    ``base_dir`` becomes the adapter's ``base_model_name_or_path``, so ``hf-lowrank merge`` and
    ``PeftModel.from_pretrained`` users find the pruned base the adapter belongs to, not the
    original model.
    """
    if not isinstance(model, PeftModel):
        raise IncompatibleError(f"expected the PeftModel returned by attach(), got {type(model).__name__}")
    apply_adapter_masks(model, adapter)
    return save_adapter_on(model, directory, base_dir)


def save_compressed_model(
    model: nn.Module,
    directory: str | Path,
    tokenizer: Any = None,
    values_dtype: torch.dtype | None = None,
    adapter_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Write the compressed deliverable: bitmap-encoded pruned base, its config, and the adapter.

    Args:
        model: the adapted model (PeftModel) or a plain pruned model.
        directory: output directory (written atomically).
        tokenizer: saved alongside when given.
        values_dtype: store floating tensors in this dtype (``torch.bfloat16`` halves an fp32
            model); ``None`` keeps the model's dtype, so loading is bit-exact.
        adapter_dir: an already written adapter directory to copy into ``directory/adapter``; with
            ``None`` and a PeftModel, the adapter is written from ``model``.

    Returns:
        Sizes in bytes (``base_dense_bytes``, ``base_stored_bytes``, ``adapter_bytes``, ``file_bytes``)
        and ``encoded_tensors``; also written to ``directory/sizes.json``.
    """
    directory = Path(directory)
    # the pruned base's tensors one at a time (dequantized when 4-bit): only the encoded ones are held
    tensors = checkpoint_tensors(model, merge=False)
    plain: Any = plain_model(model)
    with atomic_directory(directory) as tmp:
        stats = save_compressed(LazyStateDict(tensors), tmp / COMPRESSED_FILE, values_dtype=values_dtype)
        plain_config(model, tensors).save_pretrained(tmp)
        if getattr(plain, "generation_config", None) is not None:
            plain.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if adapter_dir is not None:
            shutil.copytree(adapter_dir, tmp / "adapter")
        elif isinstance(model, PeftModel):
            save_salor_adapter(model, tmp / "adapter")
        adapter_bytes = (
            sum(f.stat().st_size for f in (tmp / "adapter").glob("*.safetensors")) if (tmp / "adapter").exists() else 0
        )
        sizes = {
            "base_dense_bytes": stats["dense_bytes"],
            "base_stored_bytes": stats["stored_bytes"],
            "encoded_tensors": stats["encoded_tensors"],
            "file_bytes": (tmp / COMPRESSED_FILE).stat().st_size,
            "adapter_bytes": adapter_bytes,
            "values_dtype": str(
                values_dtype or next(t.dtype for t in tensors if t.dtype.is_floating_point)
            ).removeprefix("torch."),
        }
        write_json_atomic(tmp / "sizes.json", sizes)
    return sizes


def load_compressed_model(directory: str | Path, with_adapter: bool = True, device: str = "cpu") -> nn.Module:
    """Rebuild the model from a compressed deliverable: the base bit for bit, plus the adapter.

    The model class comes from ``config.json`` (``architectures``); its dtype is the stored one.
    With ``with_adapter`` and an ``adapter/`` present the result is a ``PeftModel`` (inference mode).
    """
    directory = Path(directory)
    state = load_compressed(directory / COMPRESSED_FILE, device=device)
    config = AutoConfig.from_pretrained(directory)
    arch = (config.architectures or ["AutoModelForCausalLM"])[0]
    cls = getattr(transformers, arch, None)
    dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    if cls is None or not hasattr(cls, "_from_config"):
        cls = transformers.AutoModelForCausalLM
        model = cls.from_config(config, dtype=dtype)
    else:
        model = cls._from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied]:
        raise IncompatibleError(
            f"compressed checkpoint does not match {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.tie_weights()
    model = model.to(device).eval()
    if with_adapter and (directory / "adapter" / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(model, str(directory / "adapter")).eval()
    return model


def directory_bytes(directory: str | Path, pattern: str = "*.safetensors") -> int:
    """Total size of the files matching ``pattern`` directly in ``directory``."""
    return sum(f.stat().st_size for f in Path(directory).glob(pattern))


def export_salor(
    model: nn.Module,
    output_dir: str | Path,
    merge: bool,
    tokenizer: Any = None,
    final_dir: str | Path | None = None,
    merged_dtype: torch.dtype | None = None,
) -> ExportResult:
    """All deliverables (see the module docstring) under ``output_dir``; sizes go to the notes.

    ``final_dir`` is where ``output_dir``'s contents will live (a staged export is moved there):
    the adapter names ``final_dir/base`` as its base.
    """
    output_dir = Path(output_dir)
    if not isinstance(model, PeftModel):
        raise IncompatibleError(f"expected the PeftModel returned by attach(), got {type(model).__name__}")
    apply_adapter_masks(model, "default")  # adapter/ holds the masked factors, as save_salor_adapter writes them
    result = export_with_base(model, output_dir, merge, tokenizer, final_dir=final_dir, merged_dtype=merged_dtype)
    base_dir = result.extra["base"]
    assert result.adapter_dir is not None  # export_with_base writes it
    sizes = save_compressed_model(model, output_dir / "compressed", tokenizer=tokenizer, adapter_dir=result.adapter_dir)
    result.extra["compressed"] = output_dir / "compressed"
    dense = directory_bytes(base_dir)
    result.notes.append(
        "adapter/ is a standard LoRA relative to the PRUNED base in base/ (not the original model); "
        "plain PEFT: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('base'), 'adapter')"
    )
    result.notes.append(
        f"compressed/base.safetensors: {sizes['file_bytes'] / 2**20:.1f} MiB vs {dense / 2**20:.1f} MiB dense "
        f"({sizes['file_bytes'] / max(dense, 1):.3f}x), {sizes['encoded_tensors']} bitmap-encoded matrices"
    )
    return result
