"""Hook implementations of the ``dora`` method."""

from __future__ import annotations

from peft import PeftConfig
from torch import nn

from hf_lowrank_plugins import MethodInfo, hookimpl

from .config import DoraConfig
from .model import attach_dora


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``dora``; it trains on a 4-bit base too (QDoRA, via ``load_in_4bit=True``)."""
    return [
        MethodInfo(
            name="dora",
            config_class=DoraConfig,
            summary="DoRA: magnitude m times direction (W + s*B@A)/||.||, norm detached (PEFT use_dora)",
            supports_quantized_base=True,
        )
    ]


@hookimpl
def init_adapter(model: nn.Module, config: PeftConfig) -> nn.Module:
    """Attach PEFT DoRA layers; output equals the base at init (B = 0 and m = ||W|| row-wise)."""
    return attach_dora(model, config)
