"""APOLLO's settings, as ``peft.PeftConfig`` subclasses so the core treats them like any method config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft import PeftConfig

from hf_lowrank_plugins import MethodConfig, validate_config


@dataclass
class ApolloConfig(PeftConfig, MethodConfig):
    """APOLLO: every weight trains; the target weights' gradients are projected to rank ``rank`` by a
    random matrix (refreshed every ``update_proj_gap`` steps), AdamW's moments are kept of that
    projection only, and the ratio of its Adam update to itself scales the full gradient, per channel
    (``scale_type="channel"``) or for the whole weight (``"tensor"``). Other weights get AdamW.
    The Trainer's lr, betas, epsilon and weight decay apply to all."""

    rank: int = field(default=256, metadata={"help": "rank of the random gradient projection", "min": 1})
    proj: Literal["random", "svd"] = field(
        default="random", metadata={"help": "projection: random (APOLLO) or the gradient's SVD (GaLore's)"}
    )
    scale_type: Literal["channel", "tensor"] = field(
        default="channel", metadata={"help": "gradient scaling per channel (APOLLO) or per tensor (APOLLO-Mini)"}
    )
    scale: float = field(
        default=1.0,
        metadata={"help": "the update is multiplied by sqrt(scale) (the paper's alpha)", "min_exclusive": 0},
    )
    update_proj_gap: int = field(
        default=200, metadata={"help": "steps between two refreshes of the projection", "min": 1}
    )
    proj_type: Literal["std", "reverse_std", "left", "right"] = field(
        default="std", metadata={"help": "which side of each weight is projected (std: the smaller one)"}
    )
    target_modules: list[str] | str | None = field(
        default="all-linear",
        metadata={"help": "linear layers whose gradients are projected: names, regex or 'all-linear'"},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "layers to leave out of target_modules"}
    )
    layerwise: bool = field(
        default=False,
        metadata={
            "help": "update each target weight in a post-accumulate-grad hook as soon as its gradient exists and "
            "free that gradient (no two full target gradients at once); one process, no accumulation"
        },
    )

    def __post_init__(self) -> None:
        validate_config(self)
        super().__post_init__()


@dataclass
class ApolloMiniConfig(ApolloConfig):
    """APOLLO-Mini: rank 1, one scaling factor per weight, and the paper's scale of 128 to make up for
    the rank-1 projection's smaller norm; an SGD-sized optimizer state."""

    rank: int = field(default=1, metadata={"help": "rank of the random gradient projection", "min": 1})
    scale_type: Literal["channel", "tensor"] = field(
        default="tensor", metadata={"help": "gradient scaling per channel (APOLLO) or per tensor (APOLLO-Mini)"}
    )
    scale: float = field(
        default=128.0,
        metadata={"help": "the update is multiplied by sqrt(scale) (the paper's alpha)", "min_exclusive": 0},
    )
