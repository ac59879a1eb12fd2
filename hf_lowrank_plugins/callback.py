"""The ``TrainerCallback`` that drives a method through the Trainer's life cycle, and stops a diverged run.

A callback gets no handle on the Trainer, so it works through what the Trainer passes it: the
arguments at ``on_init_end`` (our optimizer factory needs them) and the prepared model, optimizer
and training dataloader at ``on_train_begin``.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Protocol

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .distributed import bind_zero_partitions, check_parallelism, local_values, refresh_master_weights
from .errors import DivergenceError, LowRankError
from .memory import trim_heap

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .types import MethodInfo


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    while hasattr(optimizer, "optimizer") and not getattr(optimizer, "_hf_lowrank_factory", False):
        optimizer = optimizer.optimizer
    return optimizer


class TrainerHooksGuard:
    """Gradient hook of methods that need their Trainer hooks: refuses a training step without them.

    Without the callback (and the optimizer factory) a Trainer would silently train something else:
    GaLore as plain AdamW, LoRA-GA without its initialisation, SALOR without its schedule. Hung on
    one trainable parameter (``register_post_accumulate_grad_hook``), it runs in the backward of the
    first training step. The callback arms it at ``on_train_begin``; in a training loop of your own,
    :meth:`~hf_lowrank_plugins.Adapted.build_optimizer` and
    :meth:`~hf_lowrank_plugins.Adapted.begin_training` each mark their hook as run. Forwards
    alone (evaluation, LoRA-GA's frozen gradient estimate) never trigger it. Plain data, no reference
    to the registry, so models stay deep-copyable.
    """

    #: how a loop of one's own runs each hook
    BY_HAND = {
        "wrap_optimizer": "train with the optimizer of adapted.build_optimizer(model, args)",
        "on_train_begin": "call adapted.begin_training(dataloader, optimizer, args) before the first step",
    }

    def __init__(self, method: str, needs: list[str]) -> None:
        self.method, self.needs = method, needs
        self.ran: set[str] = set()

    @property
    def active(self) -> bool:
        """Whether every needed hook ran (setting it marks all of them run, or none)."""
        return set(self.needs) <= self.ran

    @active.setter
    def active(self, value: bool) -> None:
        self.ran = set(self.needs) if value else set()

    def mark(self, hook: str) -> None:
        """Record that ``hook`` ran outside the Trainer's callback."""
        self.ran.add(hook)

    def hang_on(self, model: Any) -> None:
        """Hang the guard on ``model``'s first trainable parameter, unless it already hangs there.

        Called at attach, and again after ``on_train_begin`` changed parameters: a method that
        re-creates layers (EVA at new ranks) may have replaced the one the guard hung on.
        """
        param = next((p for p in model.parameters() if p.requires_grad), None)
        if param is not None and getattr(param, "_hf_lowrank_guard", None) is not self:
            param.register_post_accumulate_grad_hook(self)  # fires in the first training backward
            param._hf_lowrank_guard = self

    def __call__(self, param: Any) -> None:
        """Raise :class:`LowRankError` when a gradient arrives before the method's hooks ran."""
        if not self.active:
            missing = [hook for hook in self.needs if hook not in self.ran]
            by_hand = "; ".join(self.BY_HAND.get(hook, f"run {hook}") for hook in missing)
            raise LowRankError(
                f"method '{self.method}' needs its Trainer hooks ({' and '.join(missing)}), but this training step "
                "runs without them: build the Trainer with Trainer(..., **adapted.trainer_kwargs()) (Trainer "
                f"subclasses without optimizer_cls_and_kwargs: **adapted.trainer_kwargs(args)); in a training loop "
                f"of your own, {by_hand}"
            )


class AttachedMethod(Protocol):
    """What the callback drives: a model with a method attached (:class:`~hf_lowrank_plugins.Adapted` is one).

    A protocol rather than ``Adapted`` itself, so that this module sits below the API that builds it.
    """

    model: nn.Module
    method: MethodInfo
    training_args: TrainingArguments | None
    guard: TrainerHooksGuard | None

    def build_optimizer(self, model: nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
        """The optimizer the method trains with."""
        ...

    def begin_training(
        self,
        dataloader: Any,
        optimizer: torch.optim.Optimizer | None = None,
        args: TrainingArguments | None = None,
        *,
        resumed: bool = False,
    ) -> bool:
        """Run the method's ``on_train_begin`` hook; whether a parameter changed."""
        ...


class LowRankCallback(TrainerCallback):
    """Runs the method's Trainer-time hooks for one Trainer; obtain it from ``adapted.trainer_kwargs()``
    (or as ``adapted.callback``, paired with ``adapted.optimizer_factory``)."""

    def __init__(self, adapted: AttachedMethod) -> None:
        self.adapted = adapted
        #: the arguments of this callback's Trainer, from ``on_init_end``; its optimizer is built from them
        self.training_args: TrainingArguments | None = None

    def optimizer_factory(self) -> Any:
        """The factory for ``optimizer_cls_and_kwargs``: the Trainer calls ``factory()(model)``."""
        return self._build_optimizer

    def _build_optimizer(self, model: Any, **_: Any) -> Any:
        if self.training_args is None:
            raise LowRankError(
                "the optimizer factory ran before its callback saw the Trainer's arguments: pass a callback with "
                "its own factory, Trainer(..., **adapted.trainer_kwargs()) or callbacks=[adapted.callback] with "
                "optimizer_cls_and_kwargs=(adapted.optimizer_factory, {})"
            )
        return self.adapted.build_optimizer(model, self.training_args)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict | None = None,
        **kwargs: Any,
    ) -> None:
        """Stop with :class:`DivergenceError` when the logged loss or a trainable weight is not finite.

        Every logged loss is checked (it averages the steps since the last log, so a NaN in any of
        them shows), and the trainable weights with it; a run never goes on to export NaN weights.
        """
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise DivergenceError(divergence_message(state.global_step, f"the loss is {loss}", args))
        bad = non_finite_parameters(self.adapted.model) if loss is not None else []
        if bad:
            raise DivergenceError(
                divergence_message(state.global_step, f"weights are not finite ({', '.join(bad)})", args)
            )

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Remember the Trainer's arguments; check it trains the adapted model, sharded as the method allows."""
        self.training_args = self.adapted.training_args = args
        check_parallelism(self.adapted.method, args)
        model = kwargs.get("model")
        if model is not None and model is not self.adapted.model:
            raise LowRankError(
                f"the Trainer was given a different model than the one attach() returned for method "
                f"'{self.adapted.method.name}'; pass model=adapted.model"
            )

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Check the optimizer came from our factory, then run the method's ``on_train_begin`` hook."""
        info = self.adapted.method
        optimizer = _unwrap_optimizer(kwargs.get("optimizer"))
        if info.wraps_optimizer and not getattr(optimizer, "_hf_lowrank_factory", False):
            raise LowRankError(
                f"method '{info.name}' replaces the optimizer, but the Trainer built its own. Build it with "
                "Trainer(..., **adapted.trainer_kwargs()) or pass "
                "optimizer_cls_and_kwargs=(adapted.optimizer_factory, {}) (DeepSpeed-configured optimizers "
                "cannot be replaced)."
            )
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and args.world_size != world:
            raise LowRankError(
                f"this process is one of {world} launched processes (WORLD_SIZE={world}) but the Trainer trains in "
                f"{args.world_size} (parallel mode {args.parallel_mode.value}), so each would train alone on its own "
                "copy; on CPU pass TrainingArguments(use_cpu=True) (hf-lowrank train does) and launch with torchrun "
                f"--nproc_per_node {world}"
            )
        self.adapted.training_args = args
        if self.adapted.guard is not None:
            self.adapted.guard.active = True
        bind_zero_partitions(kwargs.get("optimizer"))  # an optimizer that needs whole weights under ZeRO
        # the Trainer restored the checkpoint's weights, optimizer state and global step before this event
        resumed = state.global_step > 0
        if self.adapted.begin_training(kwargs.get("train_dataloader"), optimizer, args, resumed=resumed):
            # DeepSpeed took its fp32 master copies before this; without a refresh step 1 undoes the init
            refresh_master_weights(kwargs.get("optimizer"))
            trim_heap()  # the initialisation's temporaries (gradient sums, SVD workspaces)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Arm the guard again: a later Trainer built without this method's hooks is refused, as on a fresh model."""
        if self.adapted.guard is not None:
            self.adapted.guard.active = False


def non_finite_parameters(model: Any, limit: int = 3) -> list[str]:
    """Names of up to ``limit`` trainable parameters holding NaN or infinity (this rank's part under ZeRO-3)."""
    bad = []
    for name, param in model.named_parameters():
        if param.requires_grad and not bool(local_values(param).detach().isfinite().all()):
            bad.append(name)
            if len(bad) == limit:
                break
    return bad


def divergence_message(step: int, what: str, args: TrainingArguments | None) -> str:
    """One line: where training diverged and what to change."""
    lr = f" (it is {args.learning_rate:g})" if args is not None else ""
    clip = f"; clip gradients with max_grad_norm (it is {args.max_grad_norm:g})" if args is not None else ""
    return f"training diverged at step {step}: {what}; lower the learning rate{lr}{clip}, or check the data"
