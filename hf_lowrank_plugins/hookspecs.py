"""Hook specifications: the whole contract between the core and a fine-tuning method.

A plugin is a plain module (or object) with functions marked ``@hookimpl`` whose names match the
specifications below. It is found through the ``hf_lowrank_plugins`` entry-point group.

Two kinds of hooks exist:

*Method hooks* (``init_adapter``, ``wrap_optimizer``, ``on_train_begin``, ``post_train_merge``,
``plan_memory``) are answered by the plugin that owns the method being run: the core calls
them with every *other* method plugin left out, so an implementation never has to check whether a
config is its own. Plugins that declare no method (observers, wrappers) are still called, which is
how a third party can wrap every method at once.

``describe_methods`` is called on every plugin when the registry loads it. 4-bit bases are not a
hook: the core's quantization service (:mod:`hf_lowrank_plugins.quantization`) serves every method.

Life cycle, in call order::

    registry load                   describe_methods (then check_pending: unknown hooks fail the plugin)
    attach(model, "name")          [quantize the base] -> init_adapter
    Trainer(...) / trainer.train()  wrap_optimizer (inside Trainer.create_optimizer)
    on_train_begin                  on_train_begin (fresh and resumed runs; told which)
    adapted.export(dir)             post_train_merge (a 4-bit base is dequantized before merging)
    hf-lowrank plan                 plan_memory (on a meta-device model; no weights, no training)

Which method hooks a plugin implements is read from pluggy, not declared: implementing a hook that
runs inside the Trainer (``wrap_optimizer``, ``on_train_begin``) means the method cannot run
without its Trainer hooks, and a training step without them is refused.

This module is the ground floor of the library: it imports nothing of the library but the plain
types in :mod:`.types`. :data:`HOOKS`, filled by the markers below, is the one table of hooks that
the registry's checks and :class:`~hf_lowrank_plugins.types.MethodInfo`'s derived fields read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy
import torch
from torch import nn

from .types import ExportResult

if TYPE_CHECKING:
    from peft import PeftConfig
    from torch.utils.data import DataLoader
    from transformers import TrainingArguments

    from .types import MethodInfo, PlanSettings, QuantizationSettings, SavesPretrained

PROJECT_NAME = "hf_lowrank_plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@dataclass(frozen=True)
class HookContract:
    """What the core holds a method hook's answer to, and when the hook runs."""

    returns: tuple[type, ...]  #: an answer's type; ``None`` always means "keep the default"
    in_trainer: bool = False  #: runs inside the Trainer, so training without the callback skips it


#: Method hooks by name, in life-cycle order (filled by :func:`_method_hook` as the module loads).
HOOKS: dict[str, HookContract] = {}
_Spec = TypeVar("_Spec", bound=Callable[..., Any])


def _method_hook(*returns: type, in_trainer: bool = False) -> Callable[[_Spec], _Spec]:
    """Mark a method hook (first answer wins) and enter it in :data:`HOOKS`."""

    def mark(spec: _Spec) -> _Spec:
        HOOKS[spec.__name__] = HookContract(returns=returns, in_trainer=in_trainer)
        return hookspec(firstresult=True)(spec)

    return mark


@hookspec
def describe_methods() -> list[MethodInfo]:
    """Declare the methods this plugin provides.

    Called once per plugin when the registry loads. Return a list of
    :class:`~hf_lowrank_plugins.types.MethodInfo`; a plugin that provides no method (an observer
    or wrapper) simply does not implement this hook. Declare what only the plugin knows (defaults,
    reasons, aliases, field help); which hooks it implements is read from pluggy. A method name
    claimed by two plugins cannot run until one of them is blocked.
    """
    raise NotImplementedError  # a specification; plugins implement it


@_method_hook(nn.Module)
def init_adapter(
    model: torch.nn.Module, config: PeftConfig, quantization: QuantizationSettings | None
) -> torch.nn.Module | None:
    """Attach the method described by ``config`` to ``model`` and return the adapted model.

    Method hook, called once by :func:`~hf_lowrank_plugins.attach` before the Trainer is built
    (a 4-bit model must already carry its adapter when ``Trainer.__init__`` runs).
    ``quantization`` is ``None`` unless the user asked for a 4-bit base and the method declared
    ``quantizes_base_after_init``: then the base is still full precision and the method quantizes
    it with these settings itself (an implementation may leave the argument out). The result must
    have exactly the parameters that will train set to ``requires_grad``. Unless the method says
    otherwise in its docs, the output of the returned model must equal the base model's at this
    point (identity at initialisation). Raise
    :class:`~hf_lowrank_plugins.errors.ConfigError` for a configuration that cannot work.
    """


@_method_hook(torch.optim.Optimizer, in_trainer=True)
def wrap_optimizer(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: PeftConfig,
    args: TrainingArguments,
) -> torch.optim.Optimizer | None:
    """Change or replace the optimizer the Trainer would have built.

    Method hook, called inside ``Trainer.create_optimizer`` through the factory the core passes as
    ``optimizer_cls_and_kwargs``. ``optimizer`` is exactly what the Trainer would have built from
    ``args`` (class, learning rate, betas, epsilon, weight-decay groups). Return a replacement, or
    ``None`` to keep it. The Trainer's scheduler, clipping, accelerate wrapping and checkpointing
    then apply to the result as to any optimizer, so it must implement ``state_dict`` /
    ``load_state_dict`` faithfully for resume to work.
    """


@_method_hook(bool, in_trainer=True)
def on_train_begin(
    model: torch.nn.Module,
    config: PeftConfig,
    optimizer: torch.optim.Optimizer | None,
    train_dataloader: DataLoader,
    args: TrainingArguments | None,
    resumed: bool,
) -> bool | None:
    """The method's work at the start of training: data-dependent initialisation, step schedules.

    Method hook, called from the callback's ``on_train_begin`` (and by
    :meth:`~hf_lowrank_plugins.Adapted.begin_training` in a loop of one's own): after the Trainer
    built its optimizer, prepared the model and, when ``resumed``, restored the checkpoint's weights
    and optimizer state; before the first step; with the Trainer's own training dataloader and the
    torch optimizer inside accelerate's wrapper (``None`` where a loop of one's own passes none).

    Two jobs have this shape. A data-dependent initialisation (LoRA-GA's gradient estimate, EVA's
    activation SVD) runs on fresh runs only: on ``resumed`` the checkpoint already holds its
    result. A schedule that acts after each optimizer step (SALOR's adapter masks) registers its
    hooks on ``optimizer`` (``register_step_post_hook``) and, on ``resumed``, reads its position
    from the restored state. The hook runs once per ``trainer.train()``, so a second call on the same
    Trainer must not register twice.

    Change parameters in place (``param.data.copy_``) so the optimizer keeps its references; a method
    that must re-create parameters (EVA's layers at new ranks) puts the new ones in ``optimizer``'s
    groups in place of the old, while its state is still empty. Return
    ``True`` when a parameter changed: the caller then advances every parameter's version counter,
    which writes through ``.data`` leave alone (so values derived from a parameter and cached until it
    changes, a plugin's norms of a frozen weight, are recomputed), and refreshes DeepSpeed's master
    copies.
    """


@_method_hook(dict)
def plan_memory(
    model: torch.nn.Module,
    config: PeftConfig,
    settings: PlanSettings,
    terms: dict[str, int],
) -> dict[str, int] | None:
    """The method's own terms of a predicted peak, in bytes per process (``hf-lowrank plan``).

    Method hook, called by :func:`~hf_lowrank_plugins.plan.plan_memory` with ``model`` on the meta
    device (shapes only; for an adapter method, with PEFT's adapter laid on it) and the core's
    standard ``terms`` (``weights``, ``gradients``, ``optimizer``, ``activations``, and ``runtime``:
    what the libraries hold, 0 for a GPU); ``settings.dtype``
    is the frozen base's dtype, resolved. Return new
    terms (a method's buffers, projectors, accumulators) and/or a replacement for a standard term
    the method changes (an optimizer with other state); ``None`` when the standard terms are right.
    """


@_method_hook(ExportResult)
def post_train_merge(
    model: torch.nn.Module,
    config: PeftConfig,
    output_dir: Path,
    merge: bool,
    tokenizer: SavesPretrained | None,
    final_dir: Path,
    merged_dtype: torch.dtype | None,
) -> ExportResult | None:
    """Write every deliverable of the trained model under ``output_dir``: the export hook.

    Named for its best-known job, merging, it owns the whole export: the adapter, the merged
    checkpoint, and anything else the method delivers (SALOR's compressed weights). Implement it only
    where the core's default is wrong for the method: PiSSA and LoRA-GA rewrote the base, so their
    adapter must be re-expressed on the original weights; full fine-tuning and GaLore use the default.
    Method hook, called by :meth:`~hf_lowrank_plugins.Adapted.export`. The convention is
    ``output_dir/adapter`` (a portable adapter that plain PEFT loads onto the unmodified base
    model) and, when ``merge`` is true, ``output_dir/merged`` (a plain transformers checkpoint
    with the tokenizer, when one is given). Write each directory atomically, e.g. with
    :func:`~hf_lowrank_plugins.io.atomic_directory`. Return ``None`` to use the core's default,
    which is right for any PEFT adapter whose weights are relative to the original base.

    ``output_dir`` is usually a hidden staging folder that the core moves to ``final_dir`` once
    every deliverable exists (see :mod:`~hf_lowrank_plugins.outputs`): a path written *into* a
    deliverable (an adapter naming a sibling base folder) must use ``final_dir``. ``merged_dtype``
    is the dtype ``merged/`` is saved in (``None``: the base's); pass it to
    :func:`~hf_lowrank_plugins.export.save_merged`.
    """


#: Names of the hooks answered only by the plugin owning the method being run.
METHOD_HOOKS: tuple[str, ...] = tuple(HOOKS)
#: Names of the method hooks that run inside the Trainer (through ``adapted.trainer_kwargs()``).
TRAINER_HOOKS: frozenset[str] = frozenset(name for name, hook in HOOKS.items() if hook.in_trainer)
