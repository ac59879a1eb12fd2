"""DeepSpeed ZeRO as the core sees it: which stage a run uses, partitioned parameters, master copies.

Methods never import DeepSpeed themselves; they ask here. Three facts drive this module:

* Under ZeRO-3 a parameter's ``.data`` is an empty placeholder between forward passes (the values
  live in ``param.ds_tensor``, one slice per rank). Reading or writing whole weights outside a
  forward pass (export, a finiteness check, a data-dependent initialisation) must gather them
  first, collectively on every rank: :func:`gathered`.
* Under ZeRO-1/2/3 (and DeepSpeed's bf16/fp16 optimizers) the optimizer steps on its own fp32
  master copies, taken when ``deepspeed.initialize`` wraps the model. A method that changes
  trainable weights after that (LoRA-GA at train begin) must have the masters re-read from the
  model, or the first step silently restores the old values: :func:`refresh_master_weights`.
* Under ZeRO-1/2/3 the client optimizer's parameter groups hold flat 1-D partitions spanning many
  weights. An optimizer that needs each weight's matrix (GaLore) can ask for the layout of those
  partitions (:class:`ZeroPartition`, handed to an optimizer that implements
  :class:`ZeroPartitionAware` by :func:`bind_zero_partitions`) and gather a whole weight when it
  needs one. A method that still cannot run under a stage declares ``MethodInfo.max_zero_stage``
  and is refused before training (:func:`check_zero_stage`). FSDP shards the same way;
  ``MethodInfo.no_fsdp`` says why a method cannot run there (:func:`check_parallelism`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from .errors import IncompatibleError
from .types import MethodInfo

if TYPE_CHECKING:
    from transformers import TrainingArguments


def zero_stage(args: TrainingArguments | None) -> int | None:
    """The ZeRO stage of a run's ``TrainingArguments`` (0 for DeepSpeed without ZeRO); ``None`` without DeepSpeed."""
    if args is None:
        return None
    if not getattr(args, "deepspeed", None):
        # `accelerate launch --use_deepspeed --zero_stage N` configures the Trainer through the environment
        plugin = getattr(args, "deepspeed_plugin", None)
        return None if plugin is None else int(plugin.zero_stage)
    ds_config = getattr(args, "hf_deepspeed_config", None)
    config = ds_config.config if ds_config is not None else args.deepspeed
    if not isinstance(config, dict):  # a path that TrainingArguments has not parsed (never, in transformers 5)
        return None
    return int(config.get("zero_optimization", {}).get("stage", 0))


def check_zero_stage(info: MethodInfo, stage: int | None) -> None:
    """Refuse ``info``'s method under ZeRO ``stage`` when it declared it cannot run there, with its reason."""
    if stage is not None and stage > info.max_zero_stage:
        allowed = "without ZeRO (stage 0)" if info.max_zero_stage == 0 else f"up to ZeRO-{info.max_zero_stage}"
        raise IncompatibleError(
            f"method '{info.name}' cannot train under DeepSpeed ZeRO-{stage}: {info.zero_reason}; "
            f"use DeepSpeed {allowed}, or torchrun without DeepSpeed"
        )


def uses_fsdp(args: TrainingArguments | None) -> bool:
    """Whether the run shards with FSDP: ``fsdp`` in its arguments, or ``accelerate launch --use_fsdp``
    (whose setting the Trainer's accelerator reads from the environment, not from the arguments)."""
    from_launcher = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1", "yes")
    return bool(getattr(args, "fsdp", None)) or from_launcher


def check_parallelism(info: MethodInfo, args: TrainingArguments | None) -> None:
    """Refuse ``info``'s method under the run's DeepSpeed ZeRO stage or FSDP when it declared it cannot run there."""
    check_zero_stage(info, zero_stage(args))
    if uses_fsdp(args) and info.no_fsdp:
        raise IncompatibleError(
            f"method '{info.name}' cannot train under FSDP: {info.no_fsdp}; use torchrun (DDP) or DeepSpeed "
            f"{'without ZeRO' if info.max_zero_stage == 0 else f'ZeRO-{info.max_zero_stage}'}"
        )


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is a ZeRO-3 partitioned parameter (its ``.data`` is a placeholder)."""
    return hasattr(param, "ds_id")


def local_values(param: torch.Tensor) -> torch.Tensor:
    """The values this rank holds: the whole tensor, or its ZeRO-3 partition (enough for a finiteness check)."""
    return param.ds_tensor if is_partitioned(param) else param  # type: ignore[attr-defined]


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Make every ZeRO-3 partitioned parameter in ``params`` whole for the block; a no-op for others.

    Collective: every rank must enter with the same parameters. ``modifier_rank``: the rank whose
    in-place changes are kept and scattered back on exit (``None``: the block only reads).
    """
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def end_passes_outside_engine(model: nn.Module) -> None:
    """After forward/backward passes run outside DeepSpeed's engine, let ZeRO-3 re-partition their weights.

    ZeRO-3 marks a weight as in use by a module when the module's forward gathers it and unmarks it
    in a backward hook that fires only when gradients flow into the module's inputs. A pass where no
    parameter requires a gradient (LoRA-GA's gradient estimate) leaves the marks set, and the next
    :func:`gathered` then fails with "Cannot free a ZeRO-3 parameter while it is still active".
    DeepSpeed clears them in ``release_and_reset_all``, which only its engine can call; we clear
    the marks here and leave the re-partitioning to the next gather or forward. A no-op without ZeRO-3.
    """
    for param in model.parameters():
        if is_partitioned(param):
            param.ds_active_sub_modules.clear()  # type: ignore[attr-defined]


def gathered_model(model: nn.Module, modifier_rank: int | None = None) -> contextlib.AbstractContextManager[None]:
    """:func:`gathered` for all of ``model``'s parameters (the whole model on every rank, as the
    Trainer's own ZeRO-3 ``save_model`` does)."""
    return gathered(list(model.parameters()), modifier_rank=modifier_rank)


def _optimizer_chain(optimizer: Any) -> Iterator[Any]:
    """``optimizer`` and each optimizer it wraps (accelerate's ``AcceleratedOptimizer``, the Trainer's
    ``DeepSpeedOptimizerWrapper``, DeepSpeed's ZeRO optimizer, the client optimizer), outermost first."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        yield optimizer
        optimizer = getattr(optimizer, "optimizer", None)


def refresh_master_weights(optimizer: Any) -> bool:
    """Re-read a DeepSpeed optimizer's fp32 master copies from the model's current weights.

    ``optimizer`` may be wrapped (accelerate's ``AcceleratedOptimizer``, the Trainer's
    ``DeepSpeedOptimizerWrapper``). Returns whether it held master copies (False for a plain
    ``torch.optim`` optimizer, which steps on the parameters themselves).
    """
    for inner in _optimizer_chain(optimizer):
        if callable(getattr(inner, "refresh_fp32_params", None)):
            inner.refresh_fp32_params()
            return True
    return False


@dataclass(frozen=True)
class ZeroWeight:
    """One weight of a ZeRO parameter group and the part of it this rank holds.

    This rank holds elements ``[within, within + length)`` of the flattened weight at
    ``[local, local + length)`` of its flat slice (``length`` 0: none of it).
    """

    index: int  #: position of the weight in its group (the same on every rank)
    shape: torch.Size
    local: int
    within: int
    length: int


@dataclass(frozen=True)
class ZeroPartition:
    """This rank's flat slice of one ZeRO parameter group: the single parameter the client optimizer sees.

    ZeRO-1/2 concatenate a group's weights into one flat buffer and give each rank one contiguous
    piece of it, so a weight lies on one rank or straddles two; ZeRO-3 splits every weight evenly
    across ranks and concatenates each rank's pieces. Either way the client optimizer gets an fp32
    master slice whose ``.grad`` is the matching slice of the averaged gradient. :meth:`gather`
    makes whole weights on every rank; :meth:`write_back` keeps this rank's part of an updated one.
    """

    weights: tuple[ZeroWeight, ...]
    process_group: Any

    def gather(self, weight: ZeroWeight, *flats: torch.Tensor) -> list[torch.Tensor]:
        """``weight`` whole, from each of ``flats`` (this rank's slices: the master values, their gradient).

        Collective: every rank of the group calls it for the same weights in the same order. Each
        element is written by the one rank that holds it and summed with zeros elsewhere, so the
        result is exact. One all-reduce carries all ``flats``.
        """
        import deepspeed.comm as dist

        whole = flats[0].new_zeros((len(flats), weight.shape.numel()))
        for row, flat in zip(whole, flats, strict=True):
            row[weight.within : weight.within + weight.length].copy_(flat[weight.local : weight.local + weight.length])
        dist.all_reduce(whole, group=self.process_group)
        return [row.view(weight.shape) for row in whole]

    def write_back(self, weight: ZeroWeight, whole: torch.Tensor, flat: torch.Tensor) -> None:
        """Copy this rank's part of the updated ``whole`` weight into its slice ``flat``."""
        flat[weight.local : weight.local + weight.length].copy_(
            whole.reshape(-1)[weight.within : weight.within + weight.length]
        )


@runtime_checkable
class ZeroPartitionAware(Protocol):
    """A client optimizer that can step on ZeRO partitions once told their layout (GaLore's)."""

    def bind_zero_partitions(self, partitions: dict[int, ZeroPartition]) -> None:
        """Receive the layout of each flat parameter, keyed by ``id()`` of that parameter."""


def _zero12_partitions(zero_optimizer: Any) -> dict[int, ZeroPartition]:
    """ZeRO-1/2, read from the attributes DeepSpeed 0.19 keeps for its own checkpoint conversion: each
    group's weights (``round_robin_bit16_meta``) at their offsets in the flat buffer
    (``round_robin_bit16_offsets``, alignment padding included) and each rank's piece of it
    (``parallel_partitioned_bit16_groups``)."""
    import deepspeed.comm as dist

    layouts = {}
    for group_no, group in enumerate(zero_optimizer.optimizer.param_groups):
        process_group = zero_optimizer.real_dp_process_group[group_no]
        pieces = zero_optimizer.parallel_partitioned_bit16_groups[group_no]
        rank = dist.get_rank(group=process_group)
        start = sum(piece.numel() for piece in pieces[:rank])
        end = start + pieces[rank].numel()
        weights = []
        for index, meta, offset in zip(
            zero_optimizer.round_robin_bit16_indices[group_no],
            zero_optimizer.round_robin_bit16_meta[group_no],
            zero_optimizer.round_robin_bit16_offsets[group_no],
            strict=True,
        ):
            first, last = max(start, offset), min(end, offset + meta.numel())
            weights.append(ZeroWeight(index, meta.shape, first - start, first - offset, max(0, last - first)))
        weights.sort(key=lambda w: w.index)
        layouts[id(group["params"][0])] = ZeroPartition(tuple(weights), process_group)
    return layouts


def _zero3_partitions(zero_optimizer: Any) -> dict[int, ZeroPartition]:
    """ZeRO-3: each sub-group's flat slice is this rank's piece of every weight in turn; the piece of a
    weight of n elements is its ``ds_tensor`` (``ceil(n / ranks)`` elements, the last rank's padded)."""
    import deepspeed.comm as dist

    process_group = zero_optimizer.dp_process_group
    rank = dist.get_rank(group=process_group)
    layouts = {}
    for sub_group, flat in enumerate(zero_optimizer.fp32_partitioned_groups_flat):
        weights, local = [], 0
        for index, param in enumerate(zero_optimizer.fp16_groups[sub_group]):
            piece = param.ds_tensor.ds_numel
            within = rank * piece
            length = max(0, min(piece, param.ds_numel - within))
            weights.append(ZeroWeight(index, torch.Size(param.ds_shape), local, within, length))
            local += piece
        layouts[id(flat)] = ZeroPartition(tuple(weights), process_group)
    return layouts


def _layout_reader(optimizer: Any) -> Callable[[Any], dict[int, ZeroPartition]] | None:
    """How to read ``optimizer``'s partition layout: ZeRO-3's, ZeRO-1/2's, or ``None`` (not a ZeRO optimizer)."""
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):
        return _zero3_partitions
    if hasattr(optimizer, "round_robin_bit16_offsets"):
        return _zero12_partitions
    return None


def zero_partitions(zero_optimizer: Any) -> dict[int, ZeroPartition]:
    """The layout of each flat parameter of a DeepSpeed ZeRO-1/2/3 optimizer, keyed by ``id()`` of that parameter."""
    reader = _layout_reader(zero_optimizer)
    if reader is None:
        raise TypeError(f"{type(zero_optimizer).__name__} is not a DeepSpeed ZeRO optimizer")
    return reader(zero_optimizer)


def bind_zero_partitions(optimizer: Any) -> bool:
    """Tell a :class:`ZeroPartitionAware` client optimizer under DeepSpeed ZeRO-1/2/3 how its flat parameters
    are laid out. ``optimizer`` may be wrapped. Returns whether one was told."""
    for inner in _optimizer_chain(optimizer):
        reader, client = _layout_reader(inner), getattr(inner, "optimizer", None)
        if reader is not None and isinstance(client, ZeroPartitionAware):
            client.bind_zero_partitions(reader(inner))
            return True
    return False
