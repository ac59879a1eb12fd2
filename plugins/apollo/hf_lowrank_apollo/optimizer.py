"""The official APOLLO AdamW (``apollo_torch.APOLLOAdamW`` 1.0.3) with a state dict a Trainer can resume from.

The package keeps each target weight's projector as a Python object in the optimizer state. The
Trainer saves ``optimizer.state_dict()`` with ``torch.save`` and loads it with
``torch.load(weights_only=True)``, which refuses arbitrary objects: a run with the package (also
through transformers' ``optim="apollo_adamw"``) cannot resume. Here the projector is written as its
fields (tensors, numbers, strings) and rebuilt on load; the update itself is the package's ``step``,
untouched, so a resumed run continues with the same random projection, seed and refresh schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from apollo_torch import APOLLOAdamW
from apollo_torch.random_projector import GradientProjector
from apollo_torch.svd_projector import GaLoreProjector

from hf_lowrank_plugins.optim import own_layerwise_hook

PROJECTOR = "projector"
#: Projector classes by the name written into the state dict.
PROJECTOR_CLASSES: dict[str, type] = {"GradientProjector": GradientProjector, "GaLoreProjector": GaLoreProjector}


class ResumableApolloAdamW(APOLLOAdamW):
    """``APOLLOAdamW`` whose ``state_dict`` holds only what ``torch.load(weights_only=True)`` reads back.

    ``layerwise=True``: each projected weight is updated by the package's own step, run for that
    weight alone, from a post-accumulate-grad hook as soon as autograd has finished its gradient, and
    the gradient is freed; ``step()`` then updates the other weights. APOLLO scales the full gradient,
    so (unlike GaLore) it cannot be folded into a low-rank accumulator: the update has to happen while
    the gradient exists. Each weight's projection seed is set at construction from its place among all
    groups, so the updates equal the non-layer-wise ones (transformers' ``apollo_adamw_layerwise``
    builds one optimizer per weight instead, which gives every projection the same seed).
    """

    def __init__(self, params: Iterable[Any], layerwise: bool = False, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.layerwise = layerwise
        self._hooks: list[Any] = []
        for index, group in enumerate(self._groups()):
            if "rank" not in group:
                continue
            for p in group["params"]:
                handle = own_layerwise_hook(p, self._hook_for(index) if layerwise and p.requires_grad else None)
                if handle is not None:
                    self._hooks.append(handle)

    def _groups(self) -> list[dict[str, Any]]:
        # mypy cannot see the attribute's type through the untyped package class
        return cast(list[dict[str, Any]], vars(self)["param_groups"])

    def _hook_for(self, index: int) -> Callable[[torch.Tensor], None]:
        # the group is looked up when the hook runs: loading a state dict (a resume, accelerate's device
        # placement) replaces the group dicts, and the scheduler sets the lr in the current ones
        def hook(p: torch.Tensor) -> None:
            self._step_alone(p, self._groups()[index])

        return hook

    @torch.no_grad()
    def _step_alone(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """The package's update of ``p`` alone (its state, seed and group settings), then its gradient freed."""
        if p.grad is None:
            return
        groups = self._groups()
        self.param_groups = [{**group, "params": [p]}]
        try:
            super().step()
        finally:
            self.param_groups = groups
        p.grad = None  # why layer-wise exists: the full gradient is gone before the next one is made

    def remove_hooks(self) -> None:
        """Detach the layer-wise hooks (before another optimizer takes the model over)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def state_dict(self) -> dict[str, Any]:
        """The package's state dict with each projector object replaced by a plain dict of its fields."""
        packed = super().state_dict()
        state: dict[Any, Any] = {}
        for index, entry in packed["state"].items():
            projector = entry.get(PROJECTOR)
            if projector is not None and not isinstance(projector, dict):
                entry = {**entry, PROJECTOR: {"class": type(projector).__name__, **vars(projector)}}
            state[index] = entry
        return {**packed, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Rebuild each projector from its fields, then load as the package does."""
        state: dict[Any, Any] = {}
        for index, entry in state_dict["state"].items():
            fields = entry.get(PROJECTOR)
            if isinstance(fields, dict):
                fields = dict(fields)
                projector: Any = object.__new__(PROJECTOR_CLASSES[fields.pop("class")])
                vars(projector).update(fields)
                entry = {**entry, PROJECTOR: projector}
            state[index] = entry
        super().load_state_dict({**state_dict, "state": state})


def projected_state_bytes(shape: tuple[int, int], rank: int, proj_type: str, element_size: int) -> tuple[int, int]:
    """(moments, projector) bytes of one target weight: Adam's two moments of the projected gradient
    and the projection matrix, as the package lays them out for ``proj_type``."""
    rows, cols = shape
    right = {"std": rows >= cols, "reverse_std": rows < cols, "right": True, "left": False}[proj_type]
    projected = rows * rank if right else rank * cols
    projector = rank * cols if right else rows * rank
    return 2 * projected * element_size, projector * element_size
