"""The ``TrainerCallback`` that drives a method through the Trainer's life cycle.

A callback gets no handle on the Trainer, so it works through what the Trainer passes it: the
arguments at ``on_init_end`` (our optimizer factory needs them) and the prepared model, optimizer
and training dataloader at ``on_train_begin``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .errors import LowRankError

if TYPE_CHECKING:
    from .api import Adapted


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    while hasattr(optimizer, "optimizer") and not getattr(optimizer, "_hf_lowrank_factory", False):
        optimizer = optimizer.optimizer
    return optimizer


class LowRankCallback(TrainerCallback):
    """Runs the method's Trainer-time hooks; obtain it as ``adapted.callback``."""

    def __init__(self, adapted: Adapted) -> None:
        self.adapted = adapted

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Remember the Trainer's arguments and check it trains the adapted model."""
        self.adapted.training_args = args
        model = kwargs.get("model")
        if model is not None and model is not self.adapted.model:
            raise LowRankError(
                f"the Trainer was given a different model than the one attach() returned for method "
                f"'{self.adapted.method.name}'; pass model=adapted.model"
            )

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Check the optimizer came from our factory, then run data-dependent init on fresh runs."""
        info = self.adapted.method
        optimizer = _unwrap_optimizer(kwargs.get("optimizer"))
        if info.wraps_optimizer and not getattr(optimizer, "_hf_lowrank_factory", False):
            raise LowRankError(
                f"method '{info.name}' replaces the optimizer, but the Trainer built its own. Build it with "
                "Trainer(..., **adapted.trainer_kwargs()) or pass "
                "optimizer_cls_and_kwargs=(adapted.optimizer_factory, {}) (DeepSpeed-configured optimizers "
                "cannot be replaced)."
            )
        if state.global_step > 0:  # resumed: the checkpoint already holds the initialised state
            return
        self.adapted.registry.call_method_hook(
            info,
            "init_adapter_from_data",
            model=self.adapted.model,
            config=self.adapted.config,
            train_dataloader=kwargs.get("train_dataloader"),
            args=args,
        )
