"""Hook implementations of the ``eva`` method."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hf_lowrank_lora import LORA_ALIASES
from hf_lowrank_plugins import ConfigError, MethodInfo, hookimpl
from hf_lowrank_plugins.plan import linear_shapes
from hf_lowrank_plugins.types import PlanSettings

from .config import EvaMethodConfig
from .model import attach_eva, initialise_eva

FP32 = 4


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``eva``."""
    return [
        MethodInfo(
            name="eva",
            config_class=EvaMethodConfig,
            summary="EVA: A from the SVD of each layer's inputs on the training data, ranks redistributed by "
            "explained variance (PEFT's EVA), at training start",
            aliases=LORA_ALIASES,
            max_zero_stage=0,
            zero_reason="EVA re-creates LoRA layers at their new ranks after the Trainer built the engine, whose "
            "partitions and fp32 copies are of the old layers",
            no_fsdp="EVA re-creates LoRA layers at their new ranks after FSDP wrapped them",
        )
    ]


@hookimpl
def init_adapter(model: nn.Module, config: EvaMethodConfig) -> nn.Module:
    """LoRA layers at rank r with B = 0 (identity); A is set from data when training begins."""
    return attach_eva(model, config)


@hookimpl
def on_train_begin(
    model: nn.Module,
    config: EvaMethodConfig,
    optimizer: torch.optim.Optimizer | None,
    train_dataloader: Any,
    args: Any,
    resumed: bool,
) -> bool:
    """EVA's initialisation on the Trainer's batches, fresh runs only (a checkpoint holds its result)."""
    if resumed:
        return False
    if getattr(args, "world_size", 1) > 1 and config.rho > 1:
        raise ConfigError(
            f"EVA's rank redistribution (rho={config.rho:g}) re-creates layers after DDP registered their parameters; "
            "set rho=1 (ranks stay r, the SVD gathers every process's inputs) for multi-process training"
        )
    initialise_eva(model, config, train_dataloader, optimizer)
    return True


@hookimpl
def plan_memory(
    model: nn.Module, config: EvaMethodConfig, settings: PlanSettings, terms: dict[str, int]
) -> dict[str, int]:
    """What EVA adds to LoRA's terms, as upper bounds.

    ``eva_svd``: each target's incremental SVD state while the initialisation runs (its
    ``round(r * rho)`` components and the previous batch's, in fp32; layers sharing inputs share one,
    which a meta model cannot tell, so all are counted), and the largest layer's inputs of one batch
    stacked with its components for the SVD. ``eva_ranks``: rank redistribution keeps the total rank,
    but a rank moved to a wider layer costs more parameters, gradients and Adam moments (16 bytes
    each in fp32); at most the whole budget on the widest layer.
    """
    shapes = linear_shapes(model)
    r, components = int(config.r), round(int(config.r) * config.rho)
    widest = max((out + inp for out, inp in shapes.values()), default=0)
    largest_in = max((inp for _, inp in shapes.values()), default=0)
    state = sum(2 * components * inp + 2 * inp for _, inp in shapes.values()) * FP32
    workspace = 2 * (settings.tokens + components) * largest_in * FP32
    standard = sum(r * (out + inp) for out, inp in shapes.values())
    moved = max(len(shapes) * r * widest - standard, 0) if config.rho > 1 else 0
    return {"eva_svd": state + workspace, "eva_ranks": moved * 16}
