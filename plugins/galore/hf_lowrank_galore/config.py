"""GaLore's settings, as a ``peft.PeftConfig`` subclass so the core treats it like any method config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft import PeftConfig

from hf_lowrank_plugins import MethodConfig, validate_config

#: Projection types of galore-torch 1.0. ``std`` projects the smaller side of each weight.
PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")
#: Optimizers for the low-rank moments: 32-bit AdamW, bitsandbytes-style blockwise 8-bit AdamW, or
#: Adafactor (factored second moment, transformers' arithmetic).
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")


@dataclass
class GaLoreConfig(PeftConfig, MethodConfig):
    """GaLore: full-weight training with Adam moments kept in a low-rank gradient subspace.

    No adapter is attached; every parameter trains. Target weights (2-D linear weights selected by
    ``target_modules``) get their gradient projected to rank ``rank`` by a projector refreshed from
    an SVD of the gradient every ``update_proj_gap`` steps; their Adam moments live in that low-rank
    space, which is where the optimizer-memory saving comes from.

    Attributes:
        rank: rank of the gradient projection (``rank=`` on the CLI maps here).
        update_proj_gap: steps between two SVD refreshes of the projector (refresh at step 0 too).
        scale: factor applied to the projected-back update (the paper's alpha).
        proj_type: ``std`` | ``reverse_std`` | ``right`` | ``left`` | ``full``.
        target_modules: linear layers whose weights are projected: names, regex or ``"all-linear"``.
        exclude_modules: layers to leave out of ``target_modules``.
        optimizer: ``adamw`` (32-bit moments), ``adamw8bit`` (8-bit blockwise moments, needs
            bitsandbytes) or ``adafactor`` (factored second moment of the projected gradient; its
            hyperparameters come from the Trainer's Adafactor when ``optim="adafactor"``).
        layerwise: update each target weight's low-rank gradient from a post-accumulate-grad hook,
            freeing its full gradient at once (lower peak memory; see the README for clipping).
        min_8bit_size: tensors with fewer elements keep 32-bit moments in ``adamw8bit`` mode
            (bitsandbytes' default).
    """

    rank: int = field(default=128, metadata={"help": "rank of the gradient projection", "min": 1})
    update_proj_gap: int = field(
        default=200, metadata={"help": "steps between two SVD refreshes of the projector", "min": 1}
    )
    scale: float = field(
        default=0.25, metadata={"help": "factor on the projected-back update (the paper's alpha)", "min_exclusive": 0}
    )
    proj_type: Literal["std", "reverse_std", "right", "left", "full"] = field(
        default="std", metadata={"help": "which side of each weight is projected (std: the smaller one)"}
    )
    target_modules: list[str] | str | None = field(
        default="all-linear",
        metadata={"help": "linear layers whose weights are projected: names, regex or 'all-linear'"},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "layers to leave out of target_modules"}
    )
    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = field(
        default="adamw",
        metadata={
            "help": "moments: adamw (32-bit), adamw8bit (bitsandbytes blockwise), adafactor (factored second moment)"
        },
    )
    layerwise: bool = field(
        default=False,
        metadata={"help": "update each target weight from a post-accumulate-grad hook (lower peak memory)"},
    )
    min_8bit_size: int = field(
        default=4096, metadata={"help": "adamw8bit: tensors with fewer elements keep 32-bit moments", "min": 1}
    )

    def __post_init__(self) -> None:
        """Reject settings that cannot work, naming the field and the valid values."""
        # PeftConfig.__post_init__ only exists in some peft versions; call it when present.
        parent = getattr(super(), "__post_init__", None)
        if callable(parent):
            parent()
        validate_config(self)
