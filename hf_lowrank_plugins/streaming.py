"""Plain checkpoints written tensor by tensor: no copy of the model, extra memory one layer.

Merging used to deep-copy the whole model, merge the copy and save it: twice the model's memory
at export (28 GB for a 7B bf16 model instead of 14). Here every tensor of the plain checkpoint is
produced only when the writer reaches it:

* a layer carrying an adapter is copied alone (one layer, with its factors), PEFT's own
  ``merge(safe_merge=True)`` runs on the copy, and the merged weight is written and dropped;
* a 4-bit layer is dequantized alone (``deq(Q(W))``, as :func:`~.quantization.dequantize_model`
  gives), and an adapter on it is merged with PEFT's delta (and DoRA's norm) in full precision;
* every other tensor is written from where it lies (cast on the way when a dtype is asked for).

``merge=False`` writes the base under the adapter instead (SALOR's pruned base, a dequantized
4-bit base). The result is what ``save_pretrained`` of the merged model writes: sharded
safetensors (plus ``model.safetensors.index.json`` when there are several shards) with tied
weights stored once, ``config.json`` and the generation config.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

#: transformers' own default shard size for ``save_pretrained``.
DEFAULT_MAX_SHARD_SIZE = 50 * 10**9

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class CheckpointTensor:
    """One tensor of a checkpoint to write: its name, shape and dtype now, its values when produced."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor in the file."""
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit" and type(getattr(module, "weight", None)).__name__ == "Params4bit"


def _dequantized_weight(module: Any) -> torch.Tensor:
    """``deq(Q(W))`` of a bitsandbytes ``Linear4bit`` in the (out, in) layout of ``nn.Linear``."""
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)


def _conv1d_source(module: nn.Module) -> bool:
    """A 4-bit layer quantized from GPT-2's ``Conv1D`` (stored (in, out) in the checkpoint)."""
    return issubclass(getattr(module, "source_cls", nn.Module), Conv1D)


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.detach().to(dtype) if dtype is not None and tensor.is_floating_point() else tensor.detach()


def _cast_produced(produce: Callable[[], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return _cast(produce(), dtype)


def _plain_entries(prefix: str, module: nn.Module) -> Iterator[tuple[str, torch.Tensor, None]]:
    """``(name, tensor, None)`` for a module's own parameters and persistent buffers (not its children's)."""
    for name, param in module._parameters.items():
        if param is not None:
            yield prefix + name, param, None
    for name, buf in module._buffers.items():
        if buf is not None and name not in module._non_persistent_buffers_set:
            yield prefix + name, buf, None


def _merged_weight(layer: Any, adapter: str, quantized: bool, dequant_dtype: torch.dtype) -> torch.Tensor:
    """The merged weight of one adapter layer, in the base layer's storage layout."""
    base = layer.get_base_layer()
    if not quantized:
        work = copy.deepcopy(layer)  # one layer and its factors; the live model is never touched
        work.merge(safe_merge=True, adapter_names=[adapter])
        return work.get_base_layer().weight.detach()
    # PEFT's 4-bit merge re-quantizes the merged weight (losing the update), so the same maths as its
    # bnb merge runs here in full precision: deq(W) + delta, DoRA's row scale on top.
    weight = _dequantized_weight(base).to(dequant_dtype)
    delta = layer.get_delta_weight(adapter).to(dequant_dtype)
    merged = weight + delta
    if getattr(layer, "use_dora", {}).get(adapter, False):
        magnitude = layer.lora_magnitude_vector[adapter]
        norm = magnitude.get_weight_norm(weight, delta, scaling=1).detach()
        merged = (magnitude.weight / norm).view(-1, 1) * merged
    return merged.t() if _conv1d_source(base) else merged


def _lazy_weight(
    prefix: str, base: Any, produce: Callable[[], torch.Tensor], dequant_dtype: torch.dtype
) -> tuple[str, None, tuple[tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]]:
    """The planned entry of a weight computed on demand: its name, shape and dtype, and the producer."""
    if _is_4bit(base):
        shape = tuple(base.weight.quant_state.shape)
        return prefix + "weight", None, (shape[::-1] if _conv1d_source(base) else shape, dequant_dtype, produce)
    return prefix + "weight", None, (tuple(base.weight.shape), base.weight.dtype, produce)


def _walk(prefix: str, module: nn.Module, merge: bool, dequant_dtype: torch.dtype) -> Iterator[tuple[str, Any, Any]]:
    """``(name, tensor, None)`` or ``(name, None, (shape, dtype, producer))`` for every tensor of the
    plain checkpoint, in module order."""
    if isinstance(module, ModulesToSaveWrapper):  # a trained head: the trained copy, under the head's name
        active = module.active_adapters[0] if module.active_adapters else None
        inner = module.modules_to_save[active] if active in module.modules_to_save else module.original_module
        yield from _walk(prefix, inner, merge, dequant_dtype)
        return
    if isinstance(module, BaseTunerLayer) or _is_4bit(module):
        layer: Any = module
        base = layer.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        adapter = layer.active_adapters[0] if isinstance(module, BaseTunerLayer) else None
        for name, tensor, _ in _plain_entries(prefix, base):
            if name != prefix + "weight" or not (_is_4bit(base) or (merge and adapter is not None)):
                yield name, tensor, None
            elif merge and adapter is not None:
                yield _lazy_weight(
                    prefix, base, lambda: _merged_weight(layer, adapter, _is_4bit(base), dequant_dtype), dequant_dtype
                )
            else:
                yield _lazy_weight(prefix, base, lambda: _base_weight(base, dequant_dtype), dequant_dtype)
        return
    yield from _plain_entries(prefix, module)
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(f"{prefix}{name}.", child, merge, dequant_dtype)


def _base_weight(base: Any, dequant_dtype: torch.dtype) -> torch.Tensor:
    """A base layer's weight as a plain checkpoint stores it (dequantized when 4-bit)."""
    if not _is_4bit(base):
        return base.weight.detach()
    weight = _dequantized_weight(base).to(dequant_dtype)
    return weight.t() if _conv1d_source(base) else weight


def plain_model(model: nn.Module) -> nn.Module:
    """The transformers model under any PEFT wrapper."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def checkpoint_tensors(
    model: nn.Module, merge: bool = True, dtype: torch.dtype | None = None
) -> list[CheckpointTensor]:
    """Every tensor of ``model``'s plain checkpoint, each produced on demand (see the module docstring).

    ``merge``: adapters merged in (``False``: the base under them). ``dtype`` casts floating-point
    tensors; ``None`` keeps each tensor's own (a 4-bit layer dequantizes to the model's first
    floating-point dtype, as :func:`~.quantization.dequantize_model` does). Tensors that share
    storage (tied embeddings) are listed once, under the first name.
    """
    dequant_dtype = next(
        (p.dtype for p in model.parameters() if p.dtype in (torch.float32, torch.bfloat16, torch.float16)),
        torch.float32,
    )
    entries: list[CheckpointTensor] = []
    seen: set[int] = set()
    for name, tensor, lazy in _walk("", plain_model(model), merge, dequant_dtype):
        if tensor is not None:
            key = tensor.data_ptr() if tensor.device.type != "meta" else id(tensor)
            if key in seen:
                continue
            seen.add(key)
            out_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            entries.append(CheckpointTensor(name, tuple(tensor.shape), out_dtype, partial(_cast, tensor, dtype)))
        else:
            shape, own_dtype, produce = lazy
            out_dtype = dtype if dtype is not None else own_dtype
            entries.append(CheckpointTensor(name, shape, out_dtype, partial(_cast_produced, produce, out_dtype)))
    return entries


def _header(tensors: list[CheckpointTensor], metadata: dict[str, str]) -> bytes:
    """A safetensors header for ``tensors`` in order, padded to 8 bytes, with its length prefix."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors_file(
    tensors: list[CheckpointTensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write one safetensors file, producing each tensor only when its bytes are due.

    Written by hand because ``safetensors.torch.save_file`` takes every tensor at once (the whole
    model in memory); the format's header only needs names, dtypes and shapes, which are known
    before any value is computed. Files are read back with safetensors itself.
    """
    with open(path, "wb") as f:
        f.write(_header(tensors, metadata or {"format": "pt"}))
        for t in tensors:
            value = t.produce()
            if tuple(value.shape) != t.shape or value.dtype != t.dtype:
                raise RuntimeError(
                    f"{t.name}: produced {tuple(value.shape)} {value.dtype}, planned {t.shape} {t.dtype}"
                )
            f.write(value.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)  # a view, no copy
            del value


def write_safetensors(
    tensors: list[CheckpointTensor], directory: str | Path, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
) -> list[Path]:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_size``
    bytes (a larger tensor gets a shard of its own) plus ``model.safetensors.index.json``."""
    directory = Path(directory)
    shards: list[list[CheckpointTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        write_safetensors_file(shard, directory / name)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.name: name for name, shard in zip(names, shards, strict=True) for t in shard},
        }
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [directory / n for n in names]


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A read-only state dict over :func:`checkpoint_tensors`: each value is produced when looked up,
    so a consumer that handles one tensor at a time (an encoder, a hash) never holds the model twice."""

    def __init__(self, tensors: list[CheckpointTensor]) -> None:
        self._tensors = {t.name: t for t in tensors}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name].produce()

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def plain_config(model: nn.Module, tensors: list[CheckpointTensor]) -> Any:
    """A copy of the config that goes with ``tensors``: no quantization, the architecture, their dtype."""
    plain: Any = plain_model(model)
    config = copy.deepcopy(plain.config)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    floating = [t.dtype for t in tensors if t.dtype.is_floating_point]
    config.dtype = str(max(set(floating), key=floating.count) if floating else torch.float32).split(".")[1]
    config.architectures = [type(plain).__name__]
    return config


def write_checkpoint(
    model: nn.Module,
    directory: str | Path,
    merge: bool = True,
    dtype: torch.dtype | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``model`` as a plain transformers checkpoint into the folder ``directory`` (not atomic on its own).

    Weights as :func:`checkpoint_tensors` lists them, then ``config.json`` (architecture, dtype, no
    quantization) and the generation config: what ``save_pretrained`` of the merged (or unadapted,
    dequantized) model writes, without building that model.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_tensors(model, merge=merge, dtype=dtype)
    write_safetensors(tensors, directory, max_shard_size)
    plain_config(model, tensors).save_pretrained(directory)
    plain: Any = plain_model(model)
    if plain.can_generate() and getattr(plain, "generation_config", None) is not None:
        plain.generation_config.save_pretrained(directory)
    return directory
