"""Hook implementations of the ``adam_mini`` method.

Adam-mini trains the full model; what changes is the optimizer. ``init_adapter`` makes every weight
trainable, ``wrap_optimizer`` swaps the Trainer's optimizer for the official ``Adam_mini`` with the
Trainer's hyperparameters, and the core's default export writes the fine-tuned model to ``merged/``.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from hf_lowrank_plugins import MethodInfo, hookimpl
from hf_lowrank_plugins.optim import replaced_optim_name
from hf_lowrank_plugins.targets import train_every_weight
from hf_lowrank_plugins.types import PlanSettings

from .config import AdamMiniConfig
from .optimizer import build_adam_mini, state_bytes

logger = logging.getLogger(__name__)


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``adam_mini``: an optimizer-side method that trains every weight."""
    return [
        MethodInfo(
            name="adam_mini",
            config_class=AdamMiniConfig,
            summary="Adam-mini: full fine-tuning, Adam's second moment kept once per block (the official "
            "adam-mini package), about half of AdamW's optimizer state",
            default_lr=2e-5,
            lr_reason="Adam-mini's paper trains at AdamW's rates; every weight moves, so full fine-tuning's 2e-5",
            no_quantized_base="Adam-mini updates the base weights themselves, which a 4-bit base cannot hold",
            max_zero_stage=0,
            zero_reason="ZeRO hands the optimizer flat slices without names, but Adam-mini picks each block's rule "
            "(per head, per neuron) by the parameter's name and shape",
            no_fsdp="FSDP hands the optimizer flat shards without names, but Adam-mini picks each block's rule by the "
            "parameter's name and shape",
            trains_adapter=False,
        )
    ]


@hookimpl
def init_adapter(model: nn.Module, config: AdamMiniConfig) -> nn.Module:
    """No adapter: every floating-point weight trains (as in full fine-tuning); the head geometry is
    checked now, so a model Adam-mini cannot block fails before training."""
    from .optimizer import geometry

    geometry(model, config)
    return train_every_weight(model)


@hookimpl
def wrap_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, config: AdamMiniConfig, args: Any) -> Any:
    """Replace the Trainer's optimizer by Adam-mini with the Trainer's lr, betas, epsilon and weight decay.

    Adam-mini groups the parameters itself (one group per parameter, no decay on norms and biases),
    so the Trainer's decay groups are not carried over; the Trainer's scheduler, clipping and
    checkpointing apply to it unchanged.
    """
    optim_name = replaced_optim_name(optimizer, args, "adam_mini")
    if not optim_name.startswith("adamw"):
        logger.warning(
            "Adam-mini replaces optim=%s; its betas and epsilon come from adam_beta1, adam_beta2 and adam_epsilon",
            optim_name,
        )
    return build_adam_mini(model, config, args)


@hookimpl
def plan_memory(
    model: nn.Module, config: AdamMiniConfig, settings: PlanSettings, terms: dict[str, int]
) -> dict[str, int]:
    """Adam-mini's state replaces AdamW's: the first moment of every weight and one second moment per block."""
    # the state's size depends on the parameters' shapes and names only; any hyperparameters build it
    args = SimpleNamespace(learning_rate=1e-5, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0)
    return {"optimizer": state_bytes(build_adam_mini(model, config, args))}
