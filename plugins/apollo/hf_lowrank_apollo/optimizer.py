"""The official APOLLO AdamW (``apollo_torch.APOLLOAdamW`` 1.0.3) with a state dict a Trainer can resume from.

The package keeps each target weight's projector as a Python object in the optimizer state. The
Trainer saves ``optimizer.state_dict()`` with ``torch.save`` and loads it with
``torch.load(weights_only=True)``, which refuses arbitrary objects: a run with the package (also
through transformers' ``optim="apollo_adamw"``) cannot resume. Here the projector is written as its
fields (tensors, numbers, strings) and rebuilt on load; the update itself is the package's ``step``,
untouched, so a resumed run continues with the same random projection, seed and refresh schedule.
"""

from __future__ import annotations

from typing import Any

from apollo_torch import APOLLOAdamW
from apollo_torch.random_projector import GradientProjector
from apollo_torch.svd_projector import GaLoreProjector

PROJECTOR = "projector"
#: Projector classes by the name written into the state dict.
PROJECTOR_CLASSES: dict[str, type] = {"GradientProjector": GradientProjector, "GaLoreProjector": GaLoreProjector}


class ResumableApolloAdamW(APOLLOAdamW):
    """``APOLLOAdamW`` whose ``state_dict`` holds only what ``torch.load(weights_only=True)`` reads back."""

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
