"""Hook implementations of the ``loftq`` method."""

from __future__ import annotations

from torch import nn

from hf_lowrank_lora import LORA_ALIASES, residual
from hf_lowrank_plugins import MethodInfo, QuantizationSettings, hookimpl
from hf_lowrank_plugins.types import PlanSettings

from .config import LoftqConfig
from .model import attach_loftq


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``loftq``: a 4-bit base always; the core hands the settings to ``init_adapter`` so the
    full-precision weights are measured before they are quantized."""
    return [
        MethodInfo(
            name="loftq",
            config_class=LoftqConfig,
            summary="LoftQ: QLoRA whose A, B start as the top-r SVD of W - deq(NF4(W)), so the 4-bit model starts "
            "closer to the full-precision one",
            default_lr=2e-4,
            lr_reason="as QLoRA (its paper trains at QLoRA's rates)",
            aliases=LORA_ALIASES,
            requires_quantized_base=True,
            quantizes_base_after_init=True,
            identity_at_init=False,
        )
    ]


@hookimpl
def init_adapter(model: nn.Module, config: LoftqConfig, quantization: QuantizationSettings | None) -> nn.Module:
    """NOT identity at init with respect to the 4-bit base: the output is the 4-bit model plus the repair
    of its quantization error, closer to the full-precision model (that is the method)."""
    return attach_loftq(model, config, quantization)


@hookimpl
def plan_memory(model: nn.Module, config: LoftqConfig, settings: PlanSettings, terms: dict[str, int]) -> dict[str, int]:
    """One layer at a time in fp32: its weight, the dequantized copy and the SVD's factors."""
    return {"loftq_svd": residual.decomposition_bytes(model)}
