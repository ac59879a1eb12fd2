"""Plain checkpoints written tensor by tensor: no copy of the model, extra memory one layer.

Merging used to deep-copy the whole model, merge the copy and save it: twice the model's memory
at export (28 GB for a 7B bf16 model instead of 14). Here every tensor of the plain checkpoint is
produced only when the writer reaches it:

* a layer carrying an adapter (any PEFT tuner's, trainable token rows included) is copied alone (one
  layer, with its factors), PEFT's own ``merge(safe_merge=True)`` runs on the copy, and its merged
  weight and bias are written and dropped;
* a 4-bit layer is dequantized alone (``deq(Q(W))``, as :func:`~.quantization.dequantize_model`
  gives), and an adapter on it is merged in full precision by its method family
  (:class:`DequantizedMerge`, declared on the adapter's config class: PEFT's own 4-bit merge would
  quantize the update away);
* every other tensor is written from where it lies (cast on the way when a dtype is asked for).

From disk (``hf-lowrank merge``), the model is a skeleton on the meta device with only the
adapter's tensors real, and every base tensor is read from the base checkpoint when the writer
reaches it (:class:`CheckpointReader`): a model larger than memory merges with one layer in memory.

``merge=False`` writes the base under the adapter instead (SALOR's pruned base, a dequantized
4-bit base). The result is what ``save_pretrained`` of the merged model writes: sharded
safetensors (plus ``model.safetensors.index.json`` when there are several shards) with tied
weights stored once, ``config.json`` and the generation config.
"""

from __future__ import annotations

import copy
import ctypes
import json
import math
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper, TrainableTokensWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import IncompatibleError, LowRankError
from .quantization import dequantized_4bit_weight, is_4bit_layer, is_quantized

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


_TORCH_DTYPES = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}


class CheckpointReader:
    """Single tensors of a safetensors checkpoint folder (one file, or shards with an index), on demand.

    Written by hand because ``safetensors.safe_open`` memory-maps the whole file: every page read
    through it stays counted in the process's resident memory while the file is open, so reading
    a checkpoint tensor by tensor through it grows to the whole file. Here each tensor is one
    positioned read into a fresh buffer; the page cache keeps what it likes, outside the process.
    """

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = [directory / "model.safetensors"]
        self._entries: dict[str, tuple[Path, int, tuple[int, ...], torch.dtype]] = {}
        for path in files:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            end = 8 + length + max((info["data_offsets"][1] for info in header.values()), default=0)
            if path.stat().st_size < end:
                raise ValueError(f"{path.name} is truncated ({path.stat().st_size} bytes, its header needs {end})")
            for name, info in header.items():
                start = 8 + length + info["data_offsets"][0]
                self._entries[name] = (path, start, tuple(info["shape"]), _TORCH_DTYPES[info["dtype"]])

    @staticmethod
    def available(directory: str | Path) -> bool:
        """Whether ``directory`` holds a safetensors checkpoint this reader can read."""
        directory = Path(directory)
        return (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def add_tied_names(self, tied: Mapping[str, str]) -> None:
        """Make each tied name (``lm_head.weight``) readable as the name it is tied to, which a tied
        checkpoint stores alone; an adapter that trains a copy of one of the two (``modules_to_save``)
        leaves the other to be read under its own name."""
        for name, stored in tied.items():
            if name not in self._entries and stored in self._entries:
                self._entries[name] = self._entries[stored]

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return list(self._entries)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of ``name`` as stored."""
        _, _, shape, dtype = self._entries[name]
        return shape, dtype

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read from its file into new memory."""
        path, start, shape, dtype = self._entries[name]
        out = torch.empty(shape, dtype=dtype)
        size = out.numel() * out.element_size()
        buffer = (ctypes.c_ubyte * size).from_address(out.data_ptr())  # the new tensor's bytes, written in place
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            if f.readinto(buffer) != size:
                raise OSError(f"{path}: the file ends inside tensor {name}")
        return out


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


class DequantizedMerge(Protocol):
    """The one thing the merged-checkpoint writer asks of a method family: its merge on a 4-bit base,
    declared as the static method ``merged_on_dequantized`` of a method's config class (the LoRA
    family's ``LoraMethodConfig``).

    PEFT's own merge of a 4-bit layer quantizes the merged weight again, losing most of the update, so
    a 4-bit base's merged checkpoint is computed in full precision instead, from ``deq(Q(W))``; only the
    family knows its layers' maths. A full-precision base needs nothing: PEFT's own ``merge`` runs on a
    copy of the layer, for any tuner.
    """

    def __call__(
        self, layer: nn.Module, adapter: str, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``layer``'s merged weight (``(out, in)``, the dtype of ``weight``) and bias for ``adapter``, given
        its base's dequantized weight and its bias (``None``: it has none)."""
        ...


def _dequantized_merge(config: Any) -> DequantizedMerge | None:
    """The full-precision merge of an adapter on a 4-bit layer: its config's, or, for a config of PEFT's
    own (a plain ``LoraConfig``: an adapter trained elsewhere, a user's ``get_peft_model``), that of the
    method the registry finds for it."""
    merge = getattr(config, "merged_on_dequantized", None)
    if merge is None and config is not None:
        from .registry import get_registry

        try:
            merge = getattr(get_registry().method_for_config(config).config_class, "merged_on_dequantized", None)
        except LowRankError:
            return None
    return cast(DequantizedMerge | None, merge)


@dataclass
class _Entry:
    """One tensor of the plain checkpoint as the walk finds it: a tensor of the model written as it is
    (``produce`` unset), or one computed when written (``produce``, ``shape``, ``dtype``; ``dtype=None``:
    as stored in the base checkpoint). ``tensor`` is the model's own tensor, so tied weights, which
    share it, are written once; a computed one is the same tensor only when computed from the same
    adapter tensors too (``computed_from``: a tied head's trainable token rows are the embedding's, a
    LoRA on a tied head is its own)."""

    name: str
    tensor: torch.Tensor
    produce: Callable[[], torch.Tensor] | None = None
    shape: tuple[int, ...] = ()
    dtype: torch.dtype | None = None
    computed_from: tuple[int, ...] = ()


def _conv1d_source(module: nn.Module) -> bool:
    """A 4-bit layer quantized from GPT-2's ``Conv1D`` (stored (in, out) in the checkpoint)."""
    return issubclass(getattr(module, "source_cls", nn.Module), Conv1D)


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.detach().to(dtype) if dtype is not None and tensor.is_floating_point() else tensor.detach()


def _cast_produced(produce: Callable[[], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return _cast(produce(), dtype)


def _plain_entries(prefix: str, module: nn.Module) -> Iterator[_Entry]:
    """A module's own parameters and persistent buffers (not its children's), written as they are."""
    for name, param in module._parameters.items():
        if param is not None:
            yield _Entry(prefix + name, param)
    for name, buf in module._buffers.items():
        if buf is not None and name not in module._non_persistent_buffers_set:
            yield _Entry(prefix + name, buf)


class _MergedLayer:
    """The merged parameters of one adapter layer's base, computed together when the writer first asks
    for one of them and handed out one by one: one merge per layer, one layer in memory.

    ``base_values``: a fresh copy of each base parameter (read from the base checkpoint for a
    skeleton's meta placeholders), so the merge never touches the live model.
    """

    def __init__(
        self,
        layer: Any,
        adapter: str,
        base_values: dict[str, Callable[[], torch.Tensor]],
        dequantized: DequantizedMerge | None,
        dequant_dtype: torch.dtype,
    ) -> None:
        self.layer, self.adapter, self.base_values = layer, adapter, base_values
        self.dequantized, self.dequant_dtype = dequantized, dequant_dtype
        self._merged: dict[str, torch.Tensor] = {}

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._merged:
            self._merged = self._merge()
        return self._merged.pop(name)

    def _merge(self) -> dict[str, torch.Tensor]:
        base = self.layer.get_base_layer()
        if is_4bit_layer(base):
            return self._merge_dequantized(base)
        # PEFT's own merge on a copy of this one layer whose base parameters are the fresh values
        fresh = {
            id(getattr(base, name)): nn.Parameter(value(), requires_grad=False)
            for name, value in self.base_values.items()
        }
        work = copy.deepcopy(self.layer, fresh)
        work.merge(safe_merge=True, adapter_names=[self.adapter])
        merged_base = work.get_base_layer()
        return {name: getattr(merged_base, name).detach() for name in self.base_values}

    def _merge_dequantized(self, base: Any) -> dict[str, torch.Tensor]:
        if self.dequantized is None:
            raise IncompatibleError(
                f"cannot merge adapter '{self.adapter}' into its 4-bit base: no installed method declares a "
                "full-precision merge for its config (merged_on_dequantized; PEFT's own would quantize the update "
                "away); install the method's plugin, or save the adapter only"
            )
        weight = dequantized_4bit_weight(base).to(self.dequant_dtype)
        bias = self.base_values["bias"]() if "bias" in self.base_values else None
        merged, merged_bias = self.dequantized(self.layer, self.adapter, weight, bias)
        out = {"weight": merged.t() if _conv1d_source(base) else merged}
        if merged_bias is not None:
            out["bias"] = merged_bias
        return out


def _fresh_value(tensor: torch.Tensor, name: str, source: CheckpointReader | None) -> Callable[[], torch.Tensor]:
    """A new copy of ``tensor``'s value: read from ``source`` for a skeleton's meta placeholder."""
    return partial(_read, source, name) if tensor.is_meta else tensor.detach().clone


def _computed(
    entry: _Entry,
    produce: Callable[[], torch.Tensor],
    base: Any,
    dequant_dtype: torch.dtype,
    adapter_tensors: tuple[int, ...],
) -> _Entry:
    """``entry`` (a base layer's parameter) computed when written from the layer's ``adapter_tensors`` (their
    ids); a 4-bit weight takes the plain layout."""
    computed_from = (id(entry.tensor), *adapter_tensors)
    if entry.tensor is getattr(base, "weight", None) and is_4bit_layer(base):
        shape = tuple(base.weight.quant_state.shape)
        shape = shape[::-1] if _conv1d_source(base) else shape
        return _Entry(entry.name, entry.tensor, produce, shape, dequant_dtype, computed_from)
    dtype = None if entry.tensor.is_meta else entry.tensor.dtype
    return _Entry(entry.name, entry.tensor, produce, tuple(entry.tensor.shape), dtype, computed_from)


def _adapter_layer_entries(
    prefix: str,
    layer: Any,
    merge: bool,
    dequant_dtype: torch.dtype,
    source: CheckpointReader | None,
    merges: Mapping[str, DequantizedMerge | None],
) -> Iterator[_Entry]:
    """The base of an adapter layer (any PEFT tuner's, trainable token rows included) or a bare 4-bit
    layer: merged, dequantized, or as it is. ``merges``: each adapter's merge on a 4-bit base."""
    tuned = isinstance(layer, BaseTunerLayer)
    base = layer.get_base_layer() if tuned else layer
    adapter = layer.active_adapters[0] if tuned and layer.active_adapters else None
    entries = list(_plain_entries(prefix, base))
    adapter_tensors = tuple(sorted(id(p) for n, p in layer.named_parameters() if not n.startswith("base_layer.")))
    if merge and adapter is not None:
        params = {e.name.removeprefix(prefix): e for e in entries if isinstance(e.tensor, nn.Parameter)}
        values = {name: _fresh_value(e.tensor, e.name, source) for name, e in params.items()}
        merged = _MergedLayer(layer, adapter, values, merges.get(adapter), dequant_dtype)
        for entry in entries:
            short = entry.name.removeprefix(prefix)
            yield (
                _computed(entry, partial(merged.tensor, short), base, dequant_dtype, adapter_tensors)
                if short in params
                else entry
            )
    elif is_4bit_layer(base):
        for entry in entries:
            weight = entry.tensor is base.weight
            yield (
                _computed(entry, partial(_base_weight, base, dequant_dtype), base, dequant_dtype, adapter_tensors)
                if weight
                else entry
            )
    else:
        yield from entries


def _walk(
    prefix: str,
    module: nn.Module,
    merge: bool,
    dequant_dtype: torch.dtype,
    source: CheckpointReader | None,
    merges: Mapping[str, DequantizedMerge | None],
) -> Iterator[_Entry]:
    """Every tensor of the plain checkpoint, in module order."""
    if isinstance(module, TrainableTokensWrapper):  # trained rows of an embedding, under the embedding's name
        yield from _adapter_layer_entries(prefix, module.token_adapter, merge, dequant_dtype, source, merges)
        return
    if isinstance(module, ModulesToSaveWrapper):  # a trained head: the trained copy, under the head's name
        active = module.active_adapters[0] if module.active_adapters else None
        inner = (
            module.modules_to_save[active]
            if active is not None and active in module.modules_to_save
            else module.original_module
        )
        yield from _walk(prefix, inner, merge, dequant_dtype, source, merges)
        return
    if isinstance(module, BaseTunerLayer) or is_4bit_layer(module):
        yield from _adapter_layer_entries(prefix, module, merge, dequant_dtype, source, merges)
        return
    yield from _plain_entries(prefix, module)
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(f"{prefix}{name}.", child, merge, dequant_dtype, source, merges)


def _holding(source: CheckpointReader | None, name: str) -> CheckpointReader:
    """The base checkpoint that holds ``name``, the value of a meta-device skeleton's tensor."""
    if source is None or name not in source:
        raise ValueError(f"{name} is on the meta device and not in the base checkpoint")
    return source


def _read(source: CheckpointReader | None, name: str) -> torch.Tensor:
    """``name`` from the base checkpoint, for a meta-device skeleton."""
    return _holding(source, name).read(name)


def _base_weight(base: Any, dequant_dtype: torch.dtype) -> torch.Tensor:
    """A base layer's weight as a plain checkpoint stores it (dequantized when 4-bit)."""
    if not is_4bit_layer(base):
        return base.weight.detach()
    weight = dequantized_4bit_weight(base).to(dequant_dtype)
    return weight.t() if _conv1d_source(base) else weight


def plain_model(model: nn.Module) -> nn.Module:
    """The transformers model under any PEFT wrapper."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def checkpoint_tensors(
    model: nn.Module, merge: bool = True, dtype: torch.dtype | None = None, source: CheckpointReader | None = None
) -> list[CheckpointTensor]:
    """Every tensor of ``model``'s plain checkpoint, each produced on demand (see the module docstring).

    ``merge``: adapters merged in (``False``: the base under them). ``dtype`` casts floating-point
    tensors; ``None`` keeps each tensor's own (a 4-bit layer dequantizes to the model's first
    floating-point dtype, as :func:`~.quantization.dequantize_model` does). Tensors that share
    storage (tied embeddings) are listed once, under the first name. ``source``: the base
    checkpoint that the meta-device tensors of a skeleton ``model`` are read from (every such
    name must be in it; checked before anything is written).
    """
    dequant_dtype = next(
        (p.dtype for p in model.parameters() if p.dtype in (torch.float32, torch.bfloat16, torch.float16)),
        torch.float32,
    )
    if source is not None:
        source.add_tied_names(tied_weight_names(model))
    # each adapter's merge on a 4-bit base, found once (for a PEFT config of its own, through the registry)
    configs = dict(getattr(model, "peft_config", None) or {}) if merge and is_quantized(model) else {}
    merges = {name: _dequantized_merge(config) for name, config in configs.items()}
    entries: list[CheckpointTensor] = []
    seen: set[int] = set()  # data pointers of real tensors
    seen_meta: set[int] = set()  # ids of meta tensors (tied ones are the same Parameter)
    seen_computed: set[tuple[int, ...]] = set()
    for entry in _walk("", plain_model(model), merge, dequant_dtype, source, merges):
        name, tensor = entry.name, entry.tensor
        skeleton_buffer = source is not None and name in source and not isinstance(tensor, nn.Parameter)
        if entry.produce is not None:
            if entry.computed_from in seen_computed:
                continue
            seen_computed.add(entry.computed_from)
        elif tensor.is_meta or skeleton_buffer:
            if id(tensor) in seen_meta:
                continue
            seen_meta.add(id(tensor))
        else:
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
        if entry.produce is not None:
            own_dtype = entry.dtype or _holding(source, name).shape_dtype(name)[1]  # a meta base: as stored
            out_dtype = dtype if dtype is not None else own_dtype
            entries.append(
                CheckpointTensor(name, entry.shape, out_dtype, partial(_cast_produced, entry.produce, out_dtype))
            )
        elif tensor.is_meta or skeleton_buffer:
            # a skeleton's tensor: the checkpoint's values (its real buffers were only initialised; its
            # real parameters are the adapter's, a trained head's included)
            _, stored_dtype = _holding(source, name).shape_dtype(name)
            out_dtype = dtype if dtype is not None and stored_dtype.is_floating_point else stored_dtype
            produce = partial(_cast_produced, partial(_read, source, name), out_dtype)
            entries.append(CheckpointTensor(name, tuple(tensor.shape), out_dtype, produce))
        else:
            out_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            entries.append(CheckpointTensor(name, tuple(tensor.shape), out_dtype, partial(_cast, tensor, dtype)))
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


def tied_weight_names(model: nn.Module) -> dict[str, str]:
    """The model's tied weights, ``{"lm_head.weight": "model.embed_tokens.weight"}`` (none when untied)."""
    return dict(getattr(plain_model(model), "all_tied_weights_keys", None) or {})


def plain_config(model: nn.Module, tensors: list[CheckpointTensor]) -> Any:
    """A copy of the config that goes with ``tensors``: no quantization, the architecture, their dtype,
    and word embeddings untied when the tied pair is written as two different tensors (a merged adapter
    on the head, a trained embedding copy), which loaders that tie by the config would overwrite."""
    plain: Any = plain_model(model)
    config = copy.deepcopy(plain.config)
    written = {t.name for t in tensors}
    if any(name in written and stored in written for name, stored in tied_weight_names(model).items()):
        for sub in {id(c): c for c in (config, config.get_text_config())}.values():
            if getattr(sub, "tie_word_embeddings", False):
                sub.tie_word_embeddings = False
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
    source: CheckpointReader | None = None,
) -> Path:
    """Write ``model`` as a plain transformers checkpoint into the folder ``directory`` (not atomic on its own).

    Weights as :func:`checkpoint_tensors` lists them, then ``config.json`` (architecture, dtype, no
    quantization) and the generation config: what ``save_pretrained`` of the merged (or unadapted,
    dequantized) model writes, without building that model. ``source``: see :func:`checkpoint_tensors`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_tensors(model, merge=merge, dtype=dtype, source=source)
    write_safetensors(tensors, directory, max_shard_size)
    plain_config(model, tensors).save_pretrained(directory)
    plain: Any = plain_model(model)
    if plain.can_generate() and getattr(plain, "generation_config", None) is not None:
        plain.generation_config.save_pretrained(directory)
    return directory
