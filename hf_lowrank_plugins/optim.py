"""Build exactly the optimizer ``transformers.Trainer`` would build, so a plugin can wrap it.

``Trainer.create_optimizer`` accepts a factory through ``optimizer_cls_and_kwargs``; that is the
supported slot for a custom optimizer (swapping one from a callback breaks the scheduler and
resume). Our factory rebuilds the Trainer's default from its own static helpers, then hands it to
the ``wrap_optimizer`` hook.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary
from transformers import Trainer, TrainingArguments
from transformers.trainer_optimizer import is_optimizer_factory

from .errors import ConfigError


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The Trainer's two groups: decayed weights, and biases/norms without decay (trainable only)."""
    decay = set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]  # uses no Trainer state
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]


def replaced_optim_name(optimizer: torch.optim.Optimizer, args: TrainingArguments, method: str) -> str:
    """``args.optim`` as a string, for a ``wrap_optimizer`` that replaces the Trainer's optimizer.

    Refuses what such a method cannot replace: transformers' own low-rank optimizers (``galore_*``,
    ``apollo_*``) and its layer-wise ones, which build a second optimizer of their own.
    """
    name = str(getattr(args.optim, "value", args.optim))
    if name.startswith(("galore", "apollo")) or type(optimizer).__name__ == "LayerWiseDummyOptimizer":
        raise ConfigError(
            f"TrainingArguments.optim={name!r} builds transformers' own optimizer, which method '{method}' replaces; "
            "leave optim at its default (adamw_torch) and set the method's options on attach()"
        )
    return name


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
    optimizer = optimizer_cls(groups, **kwargs)
    if "bitsandbytes" in str(optimizer_cls) and kwargs.get("optim_bits") == 8:
        keep_embeddings_32bit(model)
    return optimizer


def keep_embeddings_32bit(model: nn.Module) -> None:
    """Have bitsandbytes' 8-bit optimizers keep 32-bit state for embeddings, as ``create_optimizer`` does.

    The Trainer registers the override only for the optimizer class it built itself, so with a
    factory in ``optimizer_cls_and_kwargs`` it is ours to register (trained embeddings, ``full`` and
    GaLore's untargeted weights would otherwise get 8-bit state).
    """
    import bitsandbytes

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})


#: Each weight's layer-wise hook (a post-accumulate-grad hook by which an optimizer updates or projects the
#: weight during backward), by weight, compared by identity, whichever method's optimizer made it.
_LAYERWISE_HOOKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def own_layerwise_hook(param: torch.Tensor, hook: Callable[[torch.Tensor], None] | None) -> RemovableHandle | None:
    """Make ``hook`` the layer-wise hook on ``param`` (``None``: none), removing the one an earlier optimizer
    put there: a second Trainer for the same model, layer-wise or not, of this method or another, would
    otherwise have that hook take each gradient (update the weight, free the gradient) behind its back."""
    earlier = _LAYERWISE_HOOKS.pop(param, None)
    if earlier is not None:
        earlier.remove()
    if hook is None:
        return None
    handle = param.register_post_accumulate_grad_hook(hook)
    _LAYERWISE_HOOKS[param] = handle
    return handle
