"""Hook implementations of the ``apollo`` and ``apollo_mini`` methods.

APOLLO trains the full model; what changes is the optimizer. ``init_adapter`` checks the targets and
leaves every weight trainable, ``wrap_optimizer`` swaps the Trainer's optimizer for the package's
APOLLO AdamW (made resumable) with the Trainer's groups and hyperparameters, and the core's default
export writes the fine-tuned model to ``merged/``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from hf_lowrank_plugins import ConfigError, MethodInfo, hookimpl
from hf_lowrank_plugins.optim import replaced_optim_name
from hf_lowrank_plugins.targets import train_every_weight, weight_matrices
from hf_lowrank_plugins.types import PlanSettings

from .config import ApolloConfig, ApolloMiniConfig
from .optimizer import ResumableApolloAdamW, projected_state_bytes

logger = logging.getLogger(__name__)

_SHARDING = "hands the optimizer flat slices, but APOLLO projects and scales each weight matrix's gradient by its rows or columns"


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``apollo`` (channel-wise scaling, rank 256) and ``apollo_mini`` (rank 1, one factor per weight)."""
    common: dict[str, Any] = {
        "aliases": {"rank": "rank"},
        "default_lr": 1e-4,
        "no_quantized_base": "APOLLO updates the full-precision weights themselves; a 4-bit base cannot hold its updates",
        "max_zero_stage": 0,
        "zero_reason": f"ZeRO {_SHARDING}",
        "no_fsdp": f"FSDP {_SHARDING}",
        "trains_adapter": False,
    }
    return [
        MethodInfo(
            name="apollo",
            config_class=ApolloConfig,
            summary="APOLLO: full fine-tuning, AdamW moments of a random rank-r gradient projection scale the "
            "gradient per channel (the official apollo-torch, resumable)",
            lr_reason="APOLLO's paper trains at AdamW's rates for the model; as GaLore, 1e-4 for a 135M model over "
            "tens of steps",
            **common,
        ),
        MethodInfo(
            name="apollo_mini",
            config_class=ApolloMiniConfig,
            summary="APOLLO-Mini: rank-1 projection, one scaling factor per weight (scale 128), an SGD-sized state",
            lr_reason="as APOLLO: the paper keeps AdamW's rates, the scale of 128 making up for the rank-1 norm",
            **common,
        ),
    ]


def target_weights(model: nn.Module, config: ApolloConfig) -> dict[str, torch.Tensor]:
    """The 2-D weights APOLLO projects, by parameter name, after checking targets and rank."""
    return weight_matrices(model, config.target_modules, config.exclude_modules, int(config.rank), "APOLLO")


@hookimpl
def init_adapter(model: nn.Module, config: ApolloConfig) -> nn.Module:
    """No adapter: every weight trains; targets and rank are checked now, before training."""
    target_weights(model, config)
    return train_every_weight(model)


@hookimpl
def wrap_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, config: ApolloConfig, args: Any) -> Any:
    """Replace the Trainer's optimizer by APOLLO AdamW with the same groups, lr, betas, eps and weight decay.

    The Trainer's groups (decayed weights; biases and norms) keep their settings; the target weights
    move to groups of their own, placed last, so each weight's projection seed (the package numbers
    the parameters across groups) is the one transformers' ``optim="apollo_adamw"`` gives it.
    """
    optim_name = replaced_optim_name(optimizer, args, config.hf_lowrank_method)
    if not optim_name.startswith("adamw"):
        logger.warning(
            "APOLLO replaces optim=%s by its AdamW; betas and eps come from adam_beta1, adam_beta2 and adam_epsilon",
            optim_name,
        )
    targets = {id(p) for p in target_weights(model, config).values() if p.requires_grad}
    order = {id(p): index for index, p in enumerate(model.parameters())}
    plain: list[dict[str, Any]] = []
    projected: list[dict[str, Any]] = []
    for group in optimizer.param_groups:
        settings = {
            "lr": group.get("lr", args.learning_rate),
            "weight_decay": group.get("weight_decay", 0.0),
            "betas": (float(args.adam_beta1), float(args.adam_beta2)),
            "eps": float(args.adam_epsilon),
        }
        rest = [p for p in group["params"] if id(p) not in targets]
        mine = sorted((p for p in group["params"] if id(p) in targets), key=lambda p: order[id(p)])
        if rest:
            plain.append({"params": rest, **settings})
        if mine:
            projected.append(
                {
                    "params": mine,
                    **settings,
                    "rank": int(config.rank),
                    "proj": config.proj,
                    "scale_type": config.scale_type,
                    "scale": float(config.scale),
                    "update_proj_gap": int(config.update_proj_gap),
                    "proj_type": config.proj_type,
                }
            )
    if not projected:
        raise ConfigError(
            f"none of {config.hf_lowrank_method}'s target weights is trainable; unfreeze them or change target_modules"
        )
    if config.layerwise:
        _check_layerwise(args)
    return ResumableApolloAdamW(plain + projected, lr=float(args.learning_rate), layerwise=bool(config.layerwise))


def _check_layerwise(args: Any) -> None:
    """Refuse what layer-wise updates cannot honour, one line each; say what clipping covers."""
    if int(getattr(args, "gradient_accumulation_steps", 1)) > 1:
        raise ConfigError(
            "layer-wise APOLLO updates each weight as soon as its gradient exists, and APOLLO scales the whole "
            "gradient, which accumulation would need kept until the last micro-batch; use "
            "gradient_accumulation_steps=1 or layerwise=False"
        )
    if getattr(args, "fp16", False):
        raise ConfigError(
            "layer-wise APOLLO cannot train with fp16 loss scaling: its hooks consume each gradient inside backward, "
            "before the scaler unscales it and skips overflowing steps; use bf16=True or layerwise=False"
        )
    if int(getattr(args, "world_size", 1)) > 1:
        raise ConfigError(
            "layer-wise APOLLO updates weights from autograd hooks before DDP averages gradients; use layerwise=False "
            "for multi-process training"
        )
    if float(getattr(args, "max_grad_norm", 0) or 0) > 0:
        logger.warning(
            "layer-wise APOLLO: max_grad_norm=%s clips only the weights APOLLO does not project (their gradients are "
            "the only ones left when the Trainer clips); set max_grad_norm=0 or layerwise=False",
            args.max_grad_norm,
        )


@hookimpl
def plan_memory(
    model: nn.Module, config: ApolloConfig, settings: PlanSettings, terms: dict[str, int]
) -> dict[str, int]:
    """APOLLO's state: moments of each target's projected gradient and its projection matrix; AdamW's
    two moments for every other weight."""
    targets = target_weights(model, config)
    moments = projectors = 0
    for weight in targets.values():
        rows, cols = weight.shape
        size = weight.element_size()
        state, projector = projected_state_bytes((int(rows), int(cols)), int(config.rank), config.proj_type, size)
        moments += state
        projectors += projector
    target_ids = {id(w) for w in targets.values()}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in target_ids]
    plan = {
        "optimizer": moments + sum(2 * p.numel() * p.element_size() for p in others),
        "apollo_projectors": projectors,
    }
    if config.layerwise:  # a target's gradient lives until its hook has updated the weight
        largest = max(w.numel() * w.element_size() for w in targets.values())
        plan["gradients"] = sum(p.numel() * p.element_size() for p in others) + largest
    return plan
