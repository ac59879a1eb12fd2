"""Hook implementations of the ``pissa`` method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_lowrank_lora import LORA_ALIASES, residual
from hf_lowrank_plugins import ExportResult, MethodInfo, QuantizationSettings, hookimpl, is_quantized
from hf_lowrank_plugins.types import PlanSettings

from .config import PissaConfig
from .model import attach_pissa


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``pissa``. With ``load_in_4bit=True`` the core hands the quantization settings to
    ``init_adapter`` instead of quantizing first, so the SVD sees full-precision W (QPiSSA); an
    already-quantized base is refused in ``init_adapter``."""
    return [
        MethodInfo(
            name="pissa",
            config_class=PissaConfig,
            summary="PiSSA: A, B from the top-r SVD of W, base W - s*B@A; exports a rank-2r LoRA on W",
            default_lr=2e-5,
            lr_reason="the adapter holds W's principal singular components, so a step moves the weights about as "
            "much as full fine-tuning's; the PiSSA paper trains at the full fine-tuning rate (2e-5)",
            aliases=LORA_ALIASES,
            quantizes_base_after_init=True,
        )
    ]


@hookimpl
def init_adapter(model: nn.Module, config: PissaConfig, quantization: QuantizationSettings | None) -> nn.Module:
    """SVD-initialised LoRA layers; output equals the base at init up to fp32 rounding (up to the NF4
    rounding of W_res for QPiSSA)."""
    return attach_pissa(model, config, quantization=quantization)


@hookimpl
def plan_memory(model: nn.Module, config: PissaConfig, settings: PlanSettings, terms: dict[str, int]) -> dict[str, int]:
    """The SVD runs one layer at a time in fp32: the largest target's fp32 copy and its factors. The
    replaced weight's checkpoint pages are handed back layer by layer (``_old_pages_released``)."""
    return {"pissa_svd": residual.decomposition_bytes(model)}


@hookimpl
def post_train_merge(
    model: nn.Module,
    config: PissaConfig,
    output_dir: Path,
    merge: bool,
    tokenizer: Any,
    merged_dtype: torch.dtype | None = None,
) -> ExportResult:
    """``adapter/``: rank-2r LoRA relative to the original W (plain PEFT loads it on the untouched
    base); ``merged/``: the trained model as a plain checkpoint (4-bit residual dequantized)."""
    result = residual.export_portable(model, output_dir, "PiSSA", merge, tokenizer, merged_dtype)
    if is_quantized(model):
        result.notes.append(
            "QPiSSA: training ran on NF4(W_res); adapter/ on the original W differs from the trained model by "
            "W_res - deq(NF4(W_res)); merged/ is the trained model itself"
        )
    return result
