"""Hook implementations of the ``galore`` method.

GaLore trains the full model; what changes is the optimizer. So ``init_adapter`` only validates,
``wrap_optimizer`` swaps the Trainer's AdamW for :class:`~hf_lowrank_galore.optimizer.GaLoreAdamW`
with the same hyperparameters and groups, and ``post_train_merge`` writes the fine-tuned model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_lowrank_plugins import (
    ConfigError,
    ExportResult,
    IncompatibleError,
    MethodInfo,
    check_rank,
    find_target_modules,
    hookimpl,
    save_merged,
)

from .config import GaLoreConfig
from .optimizer import GaLoreAdamW

logger = logging.getLogger(__name__)


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``galore``: an optimizer-side method that trains every weight at full rank."""
    return [
        MethodInfo(
            name="galore",
            config_class=GaLoreConfig,
            summary="GaLore: full fine-tuning with Adam moments in a low-rank gradient subspace (SVD every T steps)",
            supports_quantized_base=False,
            wraps_optimizer=True,
            trains_adapter=False,
        )
    ]


def target_weights(model: nn.Module, config: GaLoreConfig) -> dict[str, nn.Parameter]:
    """The 2-D weights GaLore projects, by parameter name, after validating targets and rank.

    Raises :class:`~hf_lowrank_plugins.TargetError` when nothing matches and
    :class:`~hf_lowrank_plugins.ConfigError` when ``rank`` exceeds a target's smallest dimension.
    """
    modules = find_target_modules(model, config.target_modules, config.exclude_modules)
    check_rank(modules, int(config.rank))
    weights: dict[str, nn.Parameter] = {}
    for name, module in modules.items():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise IncompatibleError(
                f"GaLore needs floating-point 2-D weights; {name} has {type(weight).__name__} "
                f"{getattr(weight, 'dtype', '')}. Load the model in 16/32-bit or exclude that layer."
            )
        weights[f"{name}.weight"] = weight
    return weights


@hookimpl
def init_adapter(model: nn.Module, config: GaLoreConfig) -> nn.Module:
    """No adapter: check targets and rank now (clear error before training), return the model as is.

    Every parameter stays trainable, as GaLore is full-parameter training.
    """
    target_weights(model, config)
    return model


def _hyperparameters(group: dict, args: Any) -> dict[str, Any]:
    """lr/betas/eps/decay of one group of the Trainer-built optimizer, ``args`` where it has none."""
    return {
        "lr": group.get("lr", args.learning_rate),
        "betas": tuple(group.get("betas", (args.adam_beta1, args.adam_beta2))),
        "eps": group.get("eps", args.adam_epsilon),
        "weight_decay": group.get("weight_decay", 0.0),
    }


@hookimpl
def wrap_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, config: GaLoreConfig, args: Any) -> torch.optim.Optimizer:
    """Replace the Trainer's optimizer by GaLore AdamW with the same groups and hyperparameters.

    Each group of the Trainer's optimizer (decayed weights / biases and norms) is split into its
    target weights (``galore=True``) and the rest, keeping the group's lr, betas, eps and weight
    decay, so the Trainer's scheduler, clipping and checkpointing apply unchanged.
    """
    optim_name = str(getattr(args.optim, "value", args.optim))
    if optim_name.startswith(("galore", "apollo")):
        raise ConfigError(
            f"TrainingArguments.optim={optim_name!r} builds transformers' own low-rank optimizer; with "
            "attach(model, 'galore') leave optim at its default (adamw_torch) and set GaLore options on attach()"
        )
    if type(optimizer).__name__ == "LayerWiseDummyOptimizer":
        raise ConfigError("the Trainer built a layer-wise optimizer; leave TrainingArguments.optim at adamw_torch")
    if not optim_name.startswith("adamw"):
        logger.warning(
            "GaLore replaces optim=%s by AdamW (%s moments); only lr, betas, eps and weight decay are taken over",
            optim_name, "8-bit" if config.optimizer == "adamw8bit" else "32-bit",
        )
    if config.layerwise and getattr(args, "world_size", 1) > 1:
        raise IncompatibleError(
            "layer-wise GaLore updates weights from autograd hooks before DDP averages gradients; "
            "use layerwise=False for multi-process training"
        )
    targets = {id(p) for p in target_weights(model, config).values() if p.requires_grad}
    groups: list[dict] = []
    for group in optimizer.param_groups:
        hyper = _hyperparameters(group, args)
        projected = [p for p in group["params"] if id(p) in targets]
        plain = [p for p in group["params"] if id(p) not in targets]
        # Empty groups are kept out; the split is a deterministic function of the model, so a
        # resumed run builds the same groups in the same order and load_state_dict lines up.
        if plain:
            groups.append({"params": plain, **hyper, "galore": False})
        if projected:
            groups.append({
                "params": projected, **hyper, "galore": True, "rank": int(config.rank),
                "update_proj_gap": int(config.update_proj_gap), "scale": float(config.scale),
                "proj_type": config.proj_type,
            })
    if not any(g["galore"] for g in groups):
        raise ConfigError(
            "none of GaLore's target weights is trainable; unfreeze them or change target_modules"
        )
    return GaLoreAdamW(
        groups,
        optim_bits=8 if config.optimizer == "adamw8bit" else 32,
        min_8bit_size=int(config.min_8bit_size),
        layerwise=bool(config.layerwise),
    )


@hookimpl
def post_train_merge(model: nn.Module, config: GaLoreConfig, output_dir: Path, merge: bool, tokenizer: Any) -> ExportResult:
    """Write the fine-tuned model as a plain checkpoint at ``output_dir/merged`` (there is no adapter).

    The weights themselves were trained, so ``merge`` changes nothing: the full checkpoint is the
    only deliverable and is always written.
    """
    merged_dir = save_merged(model, Path(output_dir) / "merged", tokenizer=tokenizer, in_place=True)
    result = ExportResult(merged_dir=merged_dir)
    if not merge:
        result.notes.append("galore trains the full weights: wrote the full checkpoint to merged/ (there is no adapter)")
    return result
