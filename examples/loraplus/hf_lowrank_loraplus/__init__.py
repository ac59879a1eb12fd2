"""LoRA+ (Hayou et al. 2024) as a third-party hf-lowrank plugin, in one file.

LoRA+ is LoRA whose B matrices learn ``loraplus_lr_ratio`` times faster than A. It needs no new
layer, only a different optimizer: it takes the optimizer the Trainer built and splits every
parameter group into its B part (learning rate times the ratio) and the rest. The Trainer's
scheduler is created after this, so it scales both groups alike.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from hf_lowrank_lora import LORA_ALIASES, LoraMethodConfig, attach_lora
from hf_lowrank_plugins import MethodInfo, hookimpl


@dataclass
class LoraPlusConfig(LoraMethodConfig):
    """LoRA settings plus the learning-rate ratio of B to A (the paper suggests 16)."""

    loraplus_lr_ratio: float = field(
        default=16.0, metadata={"help": "learning rate of B / learning rate of A", "min_exclusive": 0}
    )


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``loraplus``; the core sees the ``wrap_optimizer`` below, so it knows the optimizer matters."""
    return [
        MethodInfo(
            name="loraplus", config_class=LoraPlusConfig, summary="LoRA+: B learns faster than A", aliases=LORA_ALIASES
        )
    ]


@hookimpl
def init_adapter(model, config):
    """Plain LoRA layers."""
    return attach_lora(model, config)


@hookimpl
def wrap_optimizer(model, optimizer, config, args):
    """Same optimizer class and settings, with every ``lora_B`` parameter in a group of its own."""
    b_params = {id(p) for n, p in model.named_parameters() if "lora_B" in n}
    groups = []
    for group in optimizer.param_groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        rest = [p for p in group["params"] if id(p) not in b_params]
        fast = [p for p in group["params"] if id(p) in b_params]
        groups += [{**settings, "params": rest}] if rest else []
        groups += [{**settings, "params": fast, "lr": settings["lr"] * config.loraplus_lr_ratio}] if fast else []
    # defaults may hold keys the constructor does not take (AdamW's decoupled_weight_decay)
    accepted = inspect.signature(type(optimizer).__init__).parameters
    return type(optimizer)(groups, **{k: v for k, v in optimizer.defaults.items() if k in accepted})
