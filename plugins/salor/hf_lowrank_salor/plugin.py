"""Hook implementations of the ``salor`` method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_lowrank_lora import LORA_ALIASES
from hf_lowrank_plugins import ConfigError, ExportResult, MethodInfo, QuantizationSettings, hookimpl
from hf_lowrank_plugins.plan import linear_shapes
from hf_lowrank_plugins.types import PlanSettings

from .config import SalorConfig
from .export import export_salor
from .model import AdapterMaskEnforcer, attach_salor


@hookimpl
def describe_methods() -> list[MethodInfo]:
    """Declare ``salor``. With ``load_in_4bit=True`` the core hands the quantization settings to
    ``init_adapter`` instead of quantizing first: pruning ranks full-precision magnitudes and the
    SVD sees the full-precision residual; only then is the sparse base quantized to NF4."""
    return [
        MethodInfo(
            name="salor",
            config_class=SalorConfig,
            summary="SALOR: magnitude-pruned frozen base (unstructured/global/2:4) + LoRA = rank-r SVD of the pruning residual",
            aliases=LORA_ALIASES,
            quantizes_base_after_init=True,
            identity_at_init=False,
        )
    ]


@hookimpl
def init_adapter(model: nn.Module, config: SalorConfig, quantization: QuantizationSettings | None) -> nn.Module:
    """Prune the base, initialise the repair, mask the factors. NOT identity at init: the output is
    the pruned model plus the best rank-r repair (that is the method)."""
    return attach_salor(model, config, quantization=quantization)


@hookimpl
def on_train_begin(
    model: nn.Module, config: SalorConfig, optimizer: torch.optim.Optimizer | None, args: Any, resumed: bool
) -> bool:
    """With a sparse adapter, hang the step hook that re-zeroes masked entries (and runs the cubic
    schedule) on the optimizer; on resume it takes its step and masks from the restored state. The
    optimizer itself is the Trainer's, unchanged. No parameter changes here, so returns ``False``."""
    if config.sparse_adapter:
        if optimizer is None:
            raise ConfigError(
                "SALOR's sparse adapter keeps its masks with a hook on the optimizer: pass the optimizer you "
                "train with, adapted.begin_training(dataloader, optimizer)"
            )
        if config.adapter_schedule == "cubic" and getattr(args, "deepspeed", None):
            # masks tightened on the module's weights after a step; DeepSpeed's fp32 master copies would
            # write the pruned entries back at the next step (static masks hold: their gradients are zero)
            raise ConfigError(
                "SALOR's cubic adapter schedule prunes the weights after each optimizer step, which DeepSpeed's "
                "master copies undo: set adapter_schedule='static' or train without DeepSpeed"
            )
        AdapterMaskEnforcer.attach(model, config, optimizer, resumed=resumed)
    return False


@hookimpl
def plan_memory(model: nn.Module, config: SalorConfig, settings: PlanSettings, terms: dict[str, int]) -> dict[str, int]:
    """SALOR's masks on A and B (one byte per factor entry) when the adapter is sparse; the base's
    masks exist one layer at a time at attach, which the largest layer bounds."""
    shapes = linear_shapes(model).values()
    r = int(config.r)
    largest = max(m * n for m, n in shapes)
    extras = {"salor_base_mask": largest * 5 if config.prunes_base else 0}  # a mask and fp32 magnitudes
    if config.sparse_adapter:
        extras["salor_adapter_masks"] = sum(r * (m + n) for m, n in shapes)
    return extras


@hookimpl
def post_train_merge(
    model: nn.Module,
    config: SalorConfig,
    output_dir: Path,
    merge: bool,
    tokenizer: Any,
    final_dir: Path,
    merged_dtype: torch.dtype | None = None,
) -> ExportResult:
    """``base/`` (pruned plain checkpoint), ``adapter/`` (standard LoRA on base/), ``compressed/``
    (bitmap base + adapter) and, with ``merge``, ``merged/``; the adapter names ``final_dir/base``."""
    return export_salor(model, output_dir, merge, tokenizer, final_dir=final_dir, merged_dtype=merged_dtype)
