"""(IA)^3 (Liu et al. 2022) as a third-party hf-lowrank plugin, in one file, on PEFT's ``IA3Config``.

Not of the LoRA family: each target layer's activations are scaled by a learned vector (ones at
init, so the model starts as the base), which PEFT merges into the weights. It depends on the core
and PEFT only, which is the point: the core's attach, Trainer glue, export, merge and plan serve a
PEFT tuner that has no ``lora_A``/``lora_B``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import IA3Config, get_peft_model

from hf_lowrank_plugins import MethodConfig, MethodInfo, find_target_modules, hookimpl, validate_config
from hf_lowrank_plugins.targets import is_transposed


@dataclass
class Ia3MethodConfig(IA3Config, MethodConfig):
    """PEFT's ``IA3Config`` with every linear layer targeted by default (PEFT knows the defaults of a
    few model families only); ``feedforward_modules`` defaults to the MLP projections' names."""

    target_modules: list[str] | str | None = field(
        default="all-linear", metadata={"help": "layers whose activations are scaled: names, regex or 'all-linear'"}
    )
    feedforward_modules: list[str] | str | None = field(
        default=r".*(mlp|ffn|feed_forward|DenseReluDense|intermediate|output\.dense|c_fc|c_proj|fc\d).*",
        metadata={"help": "of the targets, those whose input (not output) is scaled: names or regex"},
    )

    def __post_init__(self) -> None:
        validate_config(self)  # every field against its type (and range metadata), as --set and attach() need
        super().__post_init__()


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``ia3``."""
    return [
        MethodInfo(
            name="ia3",
            config_class=Ia3MethodConfig,
            summary="(IA)^3: learned scaling vectors on activations (PEFT's IA3), an example outside the LoRA family",
            default_lr=3e-3,
            lr_reason="the (IA)^3 paper's rate for its scaling vectors",
        )
    ]


@hookimpl
def init_adapter(model, config):
    """PEFT's IA3 layers: ones at init, so the output equals the base's."""
    targets = find_target_modules(model, config.target_modules)
    if any(is_transposed(module) for module in targets.values()):
        config.fan_in_fan_out = (
            True  # GPT-2's Conv1D: set here, so the saved config says it (PEFT would warn and flip it)
        )
    return get_peft_model(model, config)
