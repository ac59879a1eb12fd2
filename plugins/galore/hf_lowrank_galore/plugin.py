"""Hook implementations of the ``galore`` method.

GaLore trains the full model; what changes is the optimizer. So ``init_adapter`` only validates,
``wrap_optimizer`` swaps the Trainer's optimizer for :class:`~hf_lowrank_galore.optimizer.GaLoreAdamW`
(or :class:`~hf_lowrank_galore.adafactor.GaLoreAdafactor`) with the same hyperparameters and groups,
and the core's default export writes the fine-tuned model to ``merged/``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from hf_lowrank_plugins import (
    ConfigError,
    IncompatibleError,
    MethodInfo,
    hookimpl,
)
from hf_lowrank_plugins.distributed import zero_stage
from hf_lowrank_plugins.optim import replaced_optim_name
from hf_lowrank_plugins.targets import weight_matrices
from hf_lowrank_plugins.types import PlanSettings

from .adafactor import GaLoreAdafactor
from .config import GaLoreConfig
from .optimizer import GaLoreAdamW, GaLoreOptimizer

logger = logging.getLogger(__name__)


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``galore``: an optimizer-side method that trains every weight at full rank."""
    return [
        MethodInfo(
            name="galore",
            config_class=GaLoreConfig,
            summary="GaLore: full fine-tuning with Adam moments in a low-rank gradient subspace (SVD every T steps)",
            default_lr=1e-4,
            lr_reason="trains the full weights but multiplies each update by scale (0.25 by default), "
            "so about 4x the full fine-tuning rate gives full fine-tuning's step size",
            aliases={"rank": "rank"},
            no_quantized_base="GaLore updates the full-precision weights themselves; a 4-bit base cannot hold "
            "its updates (use qlora, or load the model in 16/32-bit)",
            no_fsdp="FSDP hands the optimizer flat shards of the weights, but GaLore projects each weight matrix's "
            "gradient onto its own subspace",
            trains_adapter=False,
        )
    ]


def target_weights(model: nn.Module, config: GaLoreConfig) -> dict[str, torch.Tensor]:
    """The 2-D weights GaLore projects, by parameter name, after checking targets and rank."""
    return weight_matrices(model, config.target_modules, config.exclude_modules, int(config.rank), "GaLore")


@hookimpl
def init_adapter(model: nn.Module, config: GaLoreConfig) -> nn.Module:
    """No adapter: check targets and rank now (clear error before training), return the model as is.

    Every parameter stays trainable, as GaLore is full-parameter training.
    """
    target_weights(model, config)
    return model


@hookimpl
def plan_memory(
    model: nn.Module, config: GaLoreConfig, settings: PlanSettings, terms: dict[str, int]
) -> dict[str, int]:
    """GaLore's optimizer state: moments of the projected gradients (plus the projectors) for the
    target weights, full moments for the rest; layer-wise mode holds one target's gradient at a time;
    under ZeRO one target weight and its gradient are gathered whole at a time."""
    from .projector import low_rank_shape, projection_side

    targets = target_weights(model, config)
    moment_bytes = {"adamw": 8, "adamw8bit": 2, "adafactor": 4}[config.optimizer]
    projected = projectors = 0
    for weight in targets.values():
        side = projection_side(weight.shape, config.proj_type)
        rows, cols = low_rank_shape(weight.shape, int(config.rank), side)
        projected += rows * cols
        m, n = weight.shape
        projectors += {"right": n, "left": m, "full": m + n}[side] * int(config.rank) * 4
    target_params = sum(w.numel() for w in targets.values())
    others = sum(p.numel() for p in model.parameters() if p.requires_grad) - target_params
    largest = max(w.numel() for w in targets.values())
    plan = {"optimizer": projected * moment_bytes + others * 8, "galore_projectors": projectors}
    if config.layerwise:  # a target's gradient is freed by its hook as soon as it is accumulated
        plan["gradients"] = (others + largest) * 4
    if getattr(settings, "zero_stage", 0):
        plan["galore_zero_gather"] = 2 * largest * 4  # whole fp32 values and gradient of one target
    return plan


#: transformers' Adafactor hyperparameters and the values the Trainer uses for ``optim="adafactor"``
#: (manual lr, no relative step or parameter scaling), for Trainer optimizers that are not Adafactor.
ADAFACTOR_DEFAULTS: dict[str, Any] = {
    "eps": (1e-30, 1e-3),
    "clip_threshold": 1.0,
    "decay_rate": -0.8,
    "beta1": None,
    "scale_parameter": False,
    "relative_step": False,
    "warmup_init": False,
}


def _hyperparameters(group: dict, args: Any, optimizer: str, trainer_optim: str) -> dict[str, Any]:
    """The hyperparameters of one group of the Trainer-built optimizer (``trainer_optim``), ``args``
    where it has none.

    The settings of GaLore's own optimizer are read from the group only when the Trainer built one of
    the same kind: an Adafactor group's ``eps`` is a pair of floors, an AdamW one's a float, and
    other optimizers have no betas; otherwise GaLore AdamW takes ``args.adam_*`` and GaLore Adafactor
    the Trainer's Adafactor settings.
    """
    common = {"lr": group.get("lr", args.learning_rate), "weight_decay": group.get("weight_decay", 0.0)}
    if optimizer == "adafactor":
        source = group if trainer_optim == "adafactor" else {}
        return {**common, **{key: source.get(key, default) for key, default in ADAFACTOR_DEFAULTS.items()}}
    source = group if trainer_optim.startswith("adamw") else {}
    return {
        **common,
        "betas": tuple(source.get("betas", (args.adam_beta1, args.adam_beta2))),
        "eps": source.get("eps", args.adam_epsilon),
    }


def _warn_what_is_replaced(optim_name: str, config: GaLoreConfig) -> None:
    """Say which of the Trainer's optimizer settings GaLore's optimizer takes over and which it cannot."""
    adafactor = config.optimizer == "adafactor"
    if adafactor and optim_name != "adafactor":
        logger.warning(
            "GaLore Adafactor replaces optim=%s: lr and weight decay are taken over, the rest are the Trainer's "
            "Adafactor settings (relative_step=False, scale_parameter=False); set optim='adafactor' to silence this",
            optim_name,
        )
    elif not adafactor and not optim_name.startswith("adamw"):
        logger.warning(
            "GaLore replaces optim=%s by AdamW (%s moments); lr and weight decay are taken over, betas and eps "
            "come from adam_beta1, adam_beta2 and adam_epsilon",
            optim_name,
            "8-bit" if config.optimizer == "adamw8bit" else "32-bit",
        )
    elif config.optimizer == "adamw" and "8bit" in optim_name:
        logger.warning(
            "GaLore replaces optim=%s by AdamW with 32-bit moments for every weight; for 8-bit moments set "
            "GaLore's optimizer='adamw8bit' (--set optimizer=adamw8bit)",
            optim_name,
        )


def _check_parallelism(config: GaLoreConfig, args: Any) -> None:
    """Refuse the settings that cannot train under fp16 scaling, DDP or ZeRO, with the reason."""
    if config.layerwise and getattr(args, "fp16", False):
        raise IncompatibleError(
            "layer-wise GaLore cannot train with fp16 loss scaling: its hooks consume each gradient inside "
            "backward, before the loss scaler unscales it and skips steps that overflowed, so one overflow would "
            "put inf into the weights; use bf16=True or layerwise=False"
        )
    if config.layerwise and getattr(args, "world_size", 1) > 1:
        raise IncompatibleError(
            "layer-wise GaLore updates weights from autograd hooks before DDP averages gradients; "
            "use layerwise=False for multi-process training"
        )
    stage = zero_stage(args)
    if stage and (config.layerwise or config.optimizer != "adamw"):
        raise IncompatibleError(
            f"GaLore with optimizer={config.optimizer!r}, layerwise={bool(config.layerwise)} cannot run under "
            f"DeepSpeed ZeRO-{stage}: ZeRO hands the optimizer flat slices, so the weights GaLore does "
            "not project would lose their shape (Adafactor factors their moments by rows and columns, 8-bit AdamW "
            "quantizes them in per-weight blocks) and layer-wise hooks would fire before ZeRO reduces gradients; "
            "use optimizer='adamw', layerwise=False"
        )


@hookimpl
def wrap_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, config: GaLoreConfig, args: Any
) -> GaLoreOptimizer:
    """Replace the Trainer's optimizer by GaLore AdamW or Adafactor with the same groups and hyperparameters.

    Each group of the Trainer's optimizer (decayed weights / biases and norms) is split into its
    target weights (``galore=True``) and the rest, keeping the group's lr, weight decay and (AdamW)
    betas and eps or (Adafactor) all of Adafactor's settings, so the Trainer's scheduler, clipping
    and checkpointing apply unchanged.
    """
    optim_name = replaced_optim_name(optimizer, args, "galore")
    _warn_what_is_replaced(optim_name, config)
    _check_parallelism(config, args)
    groups = _split_groups(optimizer, model, config, args, optim_name)
    if not any(g["galore"] for g in groups):
        raise ConfigError("none of GaLore's target weights is trainable; unfreeze them or change target_modules")
    if config.optimizer == "adafactor":
        return GaLoreAdafactor(groups, layerwise=bool(config.layerwise))
    return GaLoreAdamW(
        groups,
        optim_bits=8 if config.optimizer == "adamw8bit" else 32,
        min_8bit_size=int(config.min_8bit_size),
        layerwise=bool(config.layerwise),
    )


def _split_groups(
    optimizer: torch.optim.Optimizer, model: nn.Module, config: GaLoreConfig, args: Any, optim_name: str
) -> list[dict[str, Any]]:
    """Each of the Trainer's groups split into its projected target weights and the rest, hyperparameters kept."""
    targets = {id(p) for p in target_weights(model, config).values() if p.requires_grad}
    groups: list[dict[str, Any]] = []
    for group in optimizer.param_groups:
        hyper = _hyperparameters(group, args, config.optimizer, optim_name)
        projected = [p for p in group["params"] if id(p) in targets]
        plain = [p for p in group["params"] if id(p) not in targets]
        # Empty groups are kept out; the split is a deterministic function of the model, so a
        # resumed run builds the same groups in the same order and load_state_dict lines up.
        if plain:
            groups.append({"params": plain, **hyper, "galore": False})
        if projected:
            groups.append(
                {
                    "params": projected,
                    **hyper,
                    "galore": True,
                    "rank": int(config.rank),
                    "update_proj_gap": int(config.update_proj_gap),
                    "scale": float(config.scale),
                    "proj_type": config.proj_type,
                }
            )
    return groups
