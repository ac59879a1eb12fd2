"""Which modules a method adapts, checked up front so mistakes fail with a clear message.

Matching follows PEFT exactly (we call its matcher): a list matches module names or dotted
suffixes, a string is a regular expression that must match the whole name, and ``"all-linear"``
means every linear layer (``nn.Linear``, GPT-2's ``Conv1D``, their 4-bit stand-ins) except the
model's heads: the output embedding of a language model and the task head of a classifier or
question-answering model, which PEFT trains in full through ``modules_to_save`` instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError, IncompatibleError, TargetError

ALL_LINEAR = "all-linear"
#: Task heads of PEFT's classification and QA models (trained in full via ``modules_to_save``).
TASK_HEAD_NAMES = ("classifier", "score", "qa_outputs")


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear``, GPT-2's ``Conv1D`` and quantized stand-ins (bitsandbytes ``Linear4bit``/``Linear8bitLt``).

    Quantized classes are recognised by name so that bitsandbytes stays an optional dependency.
    """
    return isinstance(module, (nn.Linear, Conv1D)) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def is_transposed(module: nn.Module) -> bool:
    """True for layers storing their weight as (in, out), GPT-2's ``Conv1D`` (PEFT's ``fan_in_fan_out``)."""
    return isinstance(module, Conv1D)


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear-like layer, also for ``Conv1D`` and packed 4-bit weights."""
    layer: Any = module  # nn.Module's attributes are typed Tensor | Module
    if isinstance(module, Conv1D):
        rows, cols = layer.weight.shape  # stored (in, out)
        return int(cols), int(rows)
    return int(layer.out_features), int(layer.in_features)


def task_heads(model: nn.Module) -> dict[str, nn.Module]:
    """The heads of ``model`` that are not adapted: the output embedding, and a classifier's task head.

    A head is the module the model's ``get_output_embeddings()`` returns, or a direct child named
    like PEFT's task heads (``classifier``, ``score``, ``qa_outputs``); heads are trained in full
    (``modules_to_save``) or frozen, never adapted or quantized.
    """
    heads = {id(m) for m in _output_heads(model)}
    for name in TASK_HEAD_NAMES:
        child = getattr(model, name, None)
        if isinstance(child, nn.Module):
            heads.add(id(child))
    return {name: m for name, m in model.named_modules() if name and id(m) in heads}


def head_layers(model: nn.Module) -> list[str]:
    """Names of the linear-like layers that are, or lie inside, a head (RoBERTa's classifier has two)."""
    heads = list(task_heads(model))
    return [
        name
        for name, m in model.named_modules()
        if is_linear_like(m) and any(name == h or name.startswith(h + ".") for h in heads)
    ]


def find_target_modules(
    model: nn.Module,
    target_modules: str | Iterable[str] | None,
    exclude_modules: str | Iterable[str] | None = None,
) -> dict[str, nn.Module]:
    """Linear-like modules of ``model`` selected by ``target_modules``, by qualified name.

    Raises :class:`TargetError` when nothing matches, listing the layer names that exist.
    """
    if target_modules is None:
        target_modules = ALL_LINEAR
    linear = {name: m for name, m in model.named_modules() if name and is_linear_like(m)}
    wants_all = target_modules == ALL_LINEAR or (not isinstance(target_modules, str) and ALL_LINEAR in target_modules)
    if wants_all:
        in_heads = set(head_layers(model))
        chosen = {name: m for name, m in linear.items() if name not in in_heads}
    else:
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        matcher = LoraConfig(target_modules=targets)
        chosen = {name: m for name, m in linear.items() if check_target_module_exists(matcher, name)}
    if exclude_modules:
        excluder = LoraConfig(
            target_modules=exclude_modules if isinstance(exclude_modules, str) else list(exclude_modules)
        )
        excluded = {name for name in linear if check_target_module_exists(excluder, name)}
        if not excluded:  # PEFT would silently train every layer the user meant to leave out
            literal = f" (PEFT reads '{ALL_LINEAR}' there as a layer name)" if exclude_modules == ALL_LINEAR else ""
            available = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise TargetError(
                f"exclude_modules={exclude_modules!r} matches no linear layer of {type(model).__name__}{literal}; "
                f"name layers by their last part ({', '.join(available)}) or give a regular expression over full names"
            )
        chosen = {name: m for name, m in chosen.items() if name not in excluded}
    if not chosen:
        available = sorted({name.rsplit(".", 1)[-1] for name in linear})
        single = (
            f" (one string is a regular expression over full names: '.*{target_modules}' or a list "
            f"['{target_modules}'] name layers by their last part)"
            if isinstance(target_modules, str) and target_modules in available
            else ""
        )
        raise TargetError(
            f"target_modules={target_modules!r} matched no linear layer of {type(model).__name__}{single}. "
            f"Linear layer names in this model: {', '.join(available) or 'none'}; "
            f"use some of these, a regular expression over full names, or '{ALL_LINEAR}'."
        )
    return chosen


def check_rank(modules: dict[str, nn.Module], rank: int, what: str = "rank") -> None:
    """Raise :class:`ConfigError` unless ``0 < rank <= min(out, in)`` for every module."""
    if rank < 1:
        raise ConfigError(f"{what} must be a positive integer, got {rank}")
    too_small = {name: layer_shape(m) for name, m in modules.items() if rank > min(layer_shape(m))}
    if too_small:
        name, shape = min(too_small.items(), key=lambda kv: min(kv[1]))
        limit = min(min(s) for s in too_small.values())
        raise ConfigError(
            f"{what} {rank} is larger than the smallest dimension of {len(too_small)} target layer(s), "
            f"e.g. {name} ({shape[0]}x{shape[1]}); use {what} <= {limit} or exclude those layers"
        )


def weight_matrices(
    model: nn.Module, target_modules: Any, exclude_modules: Any, rank: int, method: str
) -> dict[str, torch.Tensor]:
    """The 2-D weights of the layers ``target_modules`` selects, by parameter name, for a method that
    projects each target weight's gradient to ``rank`` (GaLore, APOLLO).

    Raises :class:`TargetError` when nothing matches, :class:`ConfigError` when ``rank`` exceeds a
    target's smallest dimension, and :class:`IncompatibleError` naming a target whose weight is not a
    floating-point matrix (a 4-bit layer).
    """
    modules = find_target_modules(model, target_modules, exclude_modules)
    check_rank(modules, rank)
    weights: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise IncompatibleError(
                f"{method} needs floating-point 2-D weights; {name} has {type(weight).__name__} "
                f"{getattr(weight, 'dtype', '')}: load the model in 16/32-bit or exclude that layer"
            )
        weights[f"{name}.weight"] = weight
    return weights


def train_every_weight(model: nn.Module) -> nn.Module:
    """Make every floating-point parameter of ``model`` trainable (full-weight methods); returns it.

    Integer and bool tensors cannot take gradients; a loaded model can arrive partly frozen.
    """
    for param in model.parameters():
        if param.is_floating_point():
            param.requires_grad_(True)
    return model


def _output_heads(model: nn.Module) -> list[nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return [head] if head is not None else []
