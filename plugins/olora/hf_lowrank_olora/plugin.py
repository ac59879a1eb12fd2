"""Hook implementations of the ``olora`` method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_lowrank_lora import LORA_ALIASES, residual
from hf_lowrank_plugins import ExportResult, MethodInfo, hookimpl
from hf_lowrank_plugins.types import PlanSettings

from .config import OloraConfig
from .model import attach_olora


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``olora``."""
    return [
        MethodInfo(
            name="olora",
            config_class=OloraConfig,
            summary="OLoRA: B, A from the QR decomposition of W, base W - s*B@A; exports a rank-2r LoRA on W",
            default_lr=2e-4,
            lr_reason="A = R[:r] carries W's scale (as PiSSA's factors do), so a step moves the weights more than "
            "LoRA's from B = 0: on SmolLM2-135M (80 steps, r=16) 2e-4 ended at eval loss 2.926, 1e-3 at 2.961, "
            "4e-3 at 3.757 (the plugin's README)",
            aliases=LORA_ALIASES,
            no_quantized_base="OLoRA decomposes and rewrites full-precision weights; this plugin does not "
            "requantize the residual (use qlora for a 4-bit base)",
        )
    ]


@hookimpl
def init_adapter(model: nn.Module, config: OloraConfig) -> nn.Module:
    """QR-initialised LoRA layers; output equals the base at init up to fp32 rounding."""
    return attach_olora(model, config)


@hookimpl
def plan_memory(model: nn.Module, config: OloraConfig, settings: PlanSettings, terms: dict[str, int]) -> dict[str, int]:
    """The QR runs one layer at a time in fp32: the largest target's fp32 copy, and Q and R of it."""
    return {"olora_qr": residual.decomposition_bytes(model)}


@hookimpl
def post_train_merge(
    model: nn.Module,
    config: OloraConfig,
    output_dir: Path,
    merge: bool,
    tokenizer: Any,
    merged_dtype: torch.dtype | None = None,
) -> ExportResult:
    """``adapter/``: rank-2r LoRA relative to the original W (plain PEFT loads it on the untouched base,
    with no initialisation re-run); ``merged/``: the trained model as a plain checkpoint."""
    return residual.export_portable(model, output_dir, "OLoRA", merge, tokenizer, merged_dtype)
