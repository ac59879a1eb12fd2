"""Hook implementations of the ``corda`` method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from hf_lowrank_lora import LORA_ALIASES, residual
from hf_lowrank_plugins import ConfigError, ExportResult, MethodInfo, hookimpl
from hf_lowrank_plugins.plan import linear_shapes
from hf_lowrank_plugins.types import PlanSettings

from .config import CordaMethodConfig
from .model import RESUME_SLOTS, attach_corda, initialise_corda

FP32 = 4


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``corda``."""
    return [
        MethodInfo(
            name="corda",
            config_class=CordaMethodConfig,
            summary="CorDA: A, B from the SVD of W times its inputs' covariance on the training data (PEFT's CorDA, "
            "ipm or kpm) at train start, base W - s*B@A; exports a rank-2r LoRA on W",
            aliases=LORA_ALIASES,
            no_quantized_base="CorDA decomposes and rewrites full-precision weights; this plugin does not requantize "
            "the residual (use qlora for a 4-bit base)",
            max_zero_stage=0,
            zero_reason="CorDA's covariance hooks and decomposition need each weight whole on every process",
            no_fsdp="CorDA's covariance hooks and decomposition need each weight whole on every process",
        )
    ]


@hookimpl
def init_adapter(model: nn.Module, config: CordaMethodConfig) -> nn.Module:
    """Plain LoRA layers with B = 0 (output equals the base); the decomposition runs when training begins."""
    return attach_corda(model, config)


@hookimpl
def on_train_begin(
    model: nn.Module, config: CordaMethodConfig, train_dataloader: Any, args: Any, resumed: bool
) -> bool:
    """Decompose on the Trainer's batches, fresh runs only (a checkpoint's slots rebuild the base on resume)."""
    if resumed:
        return False
    if getattr(args, "world_size", 1) > 1:
        raise ConfigError(
            "CorDA's covariances come from this process's batches, so processes would decompose differently; "
            "train CorDA in one process (or initialise it in one and resume under torchrun)"
        )
    initialise_corda(model, config, train_dataloader)
    if isinstance(model, PeftModel):  # a preference trainer's reference copy becomes the initial policy again
        residual.sync_reference_copies(model)
    return True


@hookimpl
def plan_memory(
    model: nn.Module, config: CordaMethodConfig, settings: PlanSettings, terms: dict[str, int]
) -> dict[str, int]:
    """Every target's input covariance (in x in, fp32) held at once while the batches run, then the
    decomposition of one layer at a time (its fp32 copy and two factors of its size)."""
    shapes = linear_shapes(model).values()
    covariances = sum(inp * inp for _, inp in shapes) * FP32
    return {"corda_covariance": covariances + residual.decomposition_bytes(model)}


@hookimpl
def post_train_merge(
    model: nn.Module,
    config: CordaMethodConfig,
    output_dir: Path,
    merge: bool,
    tokenizer: Any,
    merged_dtype: torch.dtype | None = None,
) -> ExportResult:
    """``adapter/``: rank-2r LoRA relative to the original W (plain PEFT loads it on the untouched base);
    ``merged/``: the trained model as a plain checkpoint."""
    with RESUME_SLOTS.hidden(model):  # the resume slots of A0, B0 are no part of a deliverable
        return residual.export_portable(model, output_dir, "CorDA", merge, tokenizer, merged_dtype)
