"""Hook implementations of the ``lora_ga`` method."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from hf_lowrank_lora import LORA_ALIASES, LoraModule, attach_lora, lora_layers, residual
from hf_lowrank_lora.resume import ResumeSlots
from hf_lowrank_plugins import (
    ConfigError,
    ExportResult,
    IncompatibleError,
    MethodInfo,
    hookimpl,
)
from hf_lowrank_plugins.distributed import end_passes_outside_engine, gathered, is_partitioned
from hf_lowrank_plugins.plan import linear_shapes
from hf_lowrank_plugins.quantization import is_4bit_layer, is_quantized, packed_4bit_tensors
from hf_lowrank_plugins.types import PlanSettings

from .config import LoraGaConfig
from .gradient import collect_batches, estimate_gradient_factors, layer_dims
from .grouping import ACCUMULATOR_SHARE, accumulator_bytes
from .init import init_layer

#: Checkpoint slots of A0, B0 (keys ``lora_ga_A0``/``lora_ga_B0``): a resumed run rebuilds W_res from them.
RESUME_SLOTS = ResumeSlots("lora_ga")

logger = logging.getLogger(__name__)
ADAPTER = "default"


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``lora_ga``. On a 4-bit base (QLoRA-GA) the core quantizes first; the train-start estimate
    then sees the dequantized weights and the residual is quantized again (:func:`subtract_factors`)."""
    return [
        MethodInfo(
            name="lora_ga",
            config_class=LoraGaConfig,
            summary="LoRA-GA: A, B from the SVD of the train-start gradient, base W - s*B@A; streaming estimate",
            default_lr=2e-5,
            lr_reason="the initialisation aligns the first adapter step with full fine-tuning's gradient step, "
            "so it is tuned at full-fine-tuning-like rates, like PiSSA",
            aliases=LORA_ALIASES,
            no_fsdp="its train-start initialisation rewrites A, B and W after FSDP has sharded them, which would "
            "need FSDP's summon_full_params and cannot be tested without GPUs",
        )
    ]


def _check_ranks(model: PeftModel) -> None:
    """LoRA-GA takes 2r singular directions per layer: 2r must not exceed min(out, in)."""
    bad = {
        n: (layer.r[ADAPTER], layer_dims(layer))
        for n, layer in lora_layers(model, ADAPTER).items()
        if 2 * layer.r[ADAPTER] > min(layer_dims(layer))
    }
    if bad:
        name, (r, shape) = min(bad.items(), key=lambda kv: min(kv[1][1]))
        raise ConfigError(
            f"LoRA-GA needs 2r <= min(out, in) (it splits the top 2r gradient directions between A and B), but r={r} "
            f"on {name} ({shape[0]}x{shape[1]}) and {len(bad) - 1} other layer(s); use r <= {min(shape) // 2} "
            "or exclude those layers"
        )


@hookimpl
def init_adapter(model: nn.Module, config: LoraGaConfig) -> nn.Module:
    """Attach PEFT LoRA layers with B = 0 (output equals the base); the gradient init runs at train begin."""
    residual.check_clean_base(model, "LoRA-GA")
    residual.check_untied_targets(model, config, "LoRA-GA")
    peft_model = attach_lora(model, config)
    _check_ranks(peft_model)
    RESUME_SLOTS.add(peft_model, ADAPTER)
    return peft_model


def _weights(layer: LoraModule) -> list[torch.Tensor]:
    """A, B and the base W of one LoRA layer: what the initialisation writes (for a 4-bit W, the
    tensors that hold its packed codes and scales)."""
    base = layer.get_base_layer()
    held = packed_4bit_tensors(base) if is_4bit_layer(base) else [base.weight]
    return [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, *held]


def _copy_from_rank0(layers: dict[str, LoraModule]) -> None:
    """Under DDP or ZeRO-1/2, give every rank rank 0's A, B and W_res.

    The ranks all-reduced identical statistics, but LAPACK/BLAS results can differ in the last bits
    between processes (MKL picks kernels by memory alignment), and DDP never re-syncs parameters
    after construction: one broadcast makes the ranks bit-identical. ZeRO-3 partitioned weights
    were already scattered from rank 0 when their gather closed.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    for layer in layers.values():
        for p in _weights(layer):
            if not is_partitioned(p):
                torch.distributed.broadcast(p.data, src=0)


@hookimpl
def on_train_begin(model: nn.Module, config: LoraGaConfig, train_dataloader: Any, args: Any, resumed: bool) -> bool:
    """Estimate the gradient on the Trainer's batches, set A, B from its SVD, and W <- W - s*B@A.

    Fresh runs only: a resumed run's checkpoint holds the initialised factors and the rewritten base
    (its resume slots). Output at step 0 equals the base (up to fp32 rounding). Every DDP rank sums
    the same linear
    statistics, so all ranks initialise identically. Under DeepSpeed the core then refreshes the
    optimizer's master copies of A and B (see :mod:`hf_lowrank_plugins.distributed`).
    """
    if resumed:
        return False
    if not isinstance(model, PeftModel):
        raise IncompatibleError(f"LoRA-GA expected the PeftModel returned by attach(), got {type(model).__name__}")
    batches = collect_batches(train_dataloader, config.ga_batches, config.ga_batch_size)
    factors = estimate_gradient_factors(model, config, batches, args=args, adapter=ADAPTER)
    del batches
    end_passes_outside_engine(model)
    layers = lora_layers(model, ADAPTER)
    for name, layer in layers.items():
        # under ZeRO-3 the weights are partitioned: gather them, and keep rank 0's result on every rank
        with gathered(_weights(layer), modifier_rank=0):
            init_layer(layer, ADAPTER, factors.pop(name), config, name)
    _copy_from_rank0(layers)
    with gathered([p for layer in layers.values() for p in _weights(layer)[:2]]):
        for layer in layers.values():
            RESUME_SLOTS.record(
                layer, ADAPTER, layer.lora_A[ADAPTER].weight.detach(), layer.lora_B[ADAPTER].weight.detach()
            )
        residual.store_initial_factors(model, ADAPTER)
    residual.mark_residual_base(model)
    for p in model.parameters():  # the estimate leaves none, but a grad here would enter the first step
        p.grad = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.info("LoRA-GA initialised %d layers from %s", len(layers), config.estimator)
    return True


@hookimpl
def plan_memory(
    model: nn.Module, config: LoraGaConfig, settings: PlanSettings, terms: dict[str, int]
) -> dict[str, int]:
    """LoRA-GA's initialisation, before the first step: the exact sums (the batches' factors while
    smaller than fp32 G, :func:`~hf_lowrank_lora_ga.grouping.accumulator_bytes`), one layer group at
    a time (``estimator="full"``; by default what :func:`~hf_lowrank_lora_ga.grouping.layer_group_count`
    allows), or the sketches (``sketch``)."""
    shapes = list(linear_shapes(model).values())
    if config.estimator == "sketch":
        k = config.sketch_rank or 4 * int(config.r)
        per_layer = [2 * min(k, m, n) * (m + n) * 4 + m * n * 4 for m, n in shapes]  # sketches + one gradient
        return {"lora_ga_init": max(per_layer) + sum(per_layer) - max(per_layer) // 2}
    per_batch = (config.ga_batch_size or settings.batch_size) * settings.seq_len
    rows = int(config.ga_batches) * per_batch
    total = sum(accumulator_bytes(m, n, rows) for m, n in shapes)
    if config.ga_layer_groups is not None:
        return {"lora_ga_init": 2 * math.ceil(total / int(config.ga_layer_groups))}
    # sized at run time (grouping.layer_group_count): what a group's sums add to a pass's peak (those of every
    # batch but the last) is at most a share of the memory in use after the first forward (the weights, on a
    # CPU the libraries, one batch's activations)
    added = sum(accumulator_bytes(m, n, rows - per_batch) for m, n in shapes)
    in_use = terms["weights"] + terms["runtime"] + terms["activations"]
    return {"lora_ga_init": 2 * min(added, int(ACCUMULATOR_SHARE * in_use))}


@hookimpl
def post_train_merge(
    model: nn.Module,
    config: LoraGaConfig,
    output_dir: Path,
    merge: bool,
    tokenizer: Any,
    merged_dtype: torch.dtype | None = None,
) -> ExportResult:
    """``adapter/``: rank-2r LoRA relative to the original W (plain PEFT loads it on the untouched
    base); ``merged/``: the trained model as a plain checkpoint (a 4-bit residual dequantized)."""
    with RESUME_SLOTS.hidden(model):  # the resume slots of A0, B0 are no part of a deliverable
        result = residual.export_portable(model, output_dir, "LoRA-GA", merge, tokenizer, merged_dtype)
    if is_quantized(model):
        result.notes.append(
            "QLoRA-GA: training ran on NF4(deq(NF4(W)) - s*B0@A0); adapter/ (a plain LoRA on the original weights) put "
            "on NF4(W), as a QLoRA loader does, differs from the trained model by that residual's rounding, on W by W's "
            "own 4-bit error too; merged/ is the trained model itself"
        )
    return result
