"""Build exactly the optimizer ``transformers.Trainer`` would build, so a plugin can wrap it.

``Trainer.create_optimizer`` accepts a factory through ``optimizer_cls_and_kwargs``; that is the
supported slot for a custom optimizer (swapping one from a callback breaks the scheduler and
resume). Our factory rebuilds the Trainer's default from its own static helpers, then hands it to
the ``wrap_optimizer`` hook.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_optimizer import is_optimizer_factory


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The Trainer's two groups: decayed weights, and biases/norms without decay (trainable only)."""
    decay = set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]  # uses no Trainer state
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]


def build_default_optimizer(model: nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """The optimizer ``Trainer.create_optimizer`` builds for ``args`` (``optim``, lr, betas, eps, decay)."""
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)  # type: ignore[arg-type]
    kwargs = dict(kwargs)
    if is_optimizer_factory(optimizer_cls):
        return optimizer_cls()(model, **kwargs)
    groups: object = parameter_groups(model, args.weight_decay)
    for key in ("params", "model", "optimizer_dict"):  # the Trainer's own overrides (GaLore, LOMO, ...)
        if key in kwargs:
            groups = kwargs.pop(key)
    return optimizer_cls(groups, **kwargs)
