"""Hook implementations of the ``salor`` method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainingArguments

from hf_lowrank_lora import LORA_ALIASES
from hf_lowrank_plugins import ExportResult, MethodInfo, QuantizationSettings, hookimpl
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
def wrap_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, config: SalorConfig, args: TrainingArguments
) -> None:
    """Keep the optimizer; with a sparse adapter, add the step hook that re-zeroes masked entries
    (and runs the cubic schedule). Returns ``None`` so the Trainer's optimizer is used as built."""
    if getattr(config, "sparse_adapter", False):
        AdapterMaskEnforcer(model, config).install(optimizer)
    return None


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
