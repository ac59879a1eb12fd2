"""Hook implementations of the ``loftq`` method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_lowrank_lora import LORA_ALIASES, residual
from hf_lowrank_lora.stored_base import export_with_base
from hf_lowrank_plugins import ExportResult, MethodInfo, QuantizationSettings, default_export, hookimpl
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


@hookimpl
def post_train_merge(
    model: nn.Module,
    config: LoftqConfig,
    output_dir: Path,
    merge: bool,
    tokenizer: Any,
    final_dir: Path,
    merged_dtype: torch.dtype | None = None,
) -> ExportResult:
    """One alternation: the default deliverables (the base is NF4(W), what a QLoRA loader rebuilds).
    More: ``base/`` (the trained base NF4(W - s*B@A), dequantized), ``adapter/`` naming it, ``merged/``."""
    if int(config.loftq_iter) == 1:
        return default_export(model, output_dir, merge, tokenizer=tokenizer, merged_dtype=merged_dtype)
    result = export_with_base(model, output_dir, merge, tokenizer, final_dir=final_dir, merged_dtype=merged_dtype)
    result.notes.append(
        f"LoftQ with {config.loftq_iter} alternations trained on NF4(W - s*B@A), not NF4(W): adapter/ belongs to "
        "base/ (that base dequantized); load base/ in 4-bit under it, or use merged/"
    )
    if config.bnb_4bit_use_double_quant:
        result.notes.append(
            "with double quantization a 4-bit loader rounds base/'s scales again, so the reloaded model is close to, "
            "not equal to, the trained one (bnb_4bit_use_double_quant=False makes the reload exact, as PEFT's LoftQ)"
        )
    return result
