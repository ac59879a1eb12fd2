"""The built-in ``full`` method: plain full fine-tuning, the baseline every low-rank method is judged against.

Every parameter trains with the optimizer the Trainer builds from its arguments (AdamW by default);
nothing is attached or wrapped, and the core's default export writes the trained model to ``merged/``. It lives in the core, not in a plugin distribution, so that
``hf-lowrank compare`` always has a baseline; it is listed in
:data:`~hf_lowrank_plugins.registry.BUILTIN_PLUGINS` and loaded like any other plugin, as pytest
loads its built-in plugins.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import PeftConfig
from torch import nn

from ..hookspecs import hookimpl
from ..method import MethodConfig
from ..targets import train_every_weight
from ..types import MethodInfo

NAME = "full"


@dataclass
class FullFineTuneConfig(PeftConfig, MethodConfig):
    """Full fine-tuning has no settings of its own: the optimizer comes from ``TrainingArguments``.

    A ``PeftConfig`` subclass (like GaLore's) because the core builds, stores and reports every
    method's config through that interface (``make_config``, ``Adapted.config``, ``to_dict()``
    in ``metrics.json``); an empty dataclass of the same shape would have to re-implement it.
    """


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``full``: every weight trains, so the result is a full checkpoint, never an adapter."""
    return [
        MethodInfo(
            name=NAME,
            config_class=FullFineTuneConfig,
            summary="full fine-tuning with the Trainer's default optimizer (built-in baseline)",
            default_lr=2e-5,
            lr_reason="every pretrained weight moves: larger rates undo pretraining; 2e-5 is the usual SFT rate "
            "(TRL's SFTConfig default)",
            no_quantized_base="full fine-tuning updates the base weights themselves, which a 4-bit base cannot hold",
            trains_adapter=False,
            baseline=True,
        )
    ]


@hookimpl
def init_adapter(model: nn.Module, config: FullFineTuneConfig) -> nn.Module:
    """Make every floating-point parameter trainable and return the model itself (nothing attached)."""
    return train_every_weight(model)
