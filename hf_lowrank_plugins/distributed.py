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
  weights, so an optimizer that needs each weight's matrix shape (GaLore) cannot run there; such a
  method declares ``MethodInfo.max_zero_stage`` and is refused before training
  (:func:`check_zero_stage`). FSDP shards the same way; ``MethodInfo.no_fsdp`` says why a method
  cannot run there (:func:`check_parallelism`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .errors import IncompatibleError
from .method import MethodInfo


def zero_stage(args: Any) -> int | None:
    """The ZeRO stage of a run's ``TrainingArguments`` (0 for DeepSpeed without ZeRO); ``None`` without DeepSpeed."""
    if args is None or not getattr(args, "deepspeed", None):
        return None
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


def check_parallelism(info: MethodInfo, args: Any) -> None:
    """Refuse ``info``'s method under the run's DeepSpeed ZeRO stage or FSDP when it declared it cannot run there."""
    check_zero_stage(info, zero_stage(args))
    if getattr(args, "fsdp", None) and info.no_fsdp:
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


def refresh_master_weights(optimizer: Any) -> bool:
    """Re-read a DeepSpeed optimizer's fp32 master copies from the model's current weights.

    ``optimizer`` may be wrapped (accelerate's ``AcceleratedOptimizer``, the Trainer's
    ``DeepSpeedOptimizerWrapper``). Returns whether it held master copies (False for a plain
    ``torch.optim`` optimizer, which steps on the parameters themselves).
    """
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if callable(getattr(optimizer, "refresh_fp32_params", None)):
            optimizer.refresh_fp32_params()
            return True
        optimizer = getattr(optimizer, "optimizer", None)
    return False
