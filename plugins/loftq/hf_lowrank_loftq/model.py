"""LoftQ on PEFT's LoRA layers over the core's 4-bit base: PEFT's ``replace_lora_weights_loftq`` (one
alternation) and ``LoftQConfig(loftq_iter=T)`` (T alternations), for any alpha and on any device.

PEFT's ``replace_lora_weights_loftq`` reads the original weights back from the checkpoint's safetensors
file after loading in 4-bit, runs on CUDA or XPU only (it moves every weight there), and sets
``B = U sqrt(S)``, ``A = sqrt(S) V^T``, which repairs the error only where ``s = alpha / r`` is 1.
Here each target's full-precision weight is at hand before the core quantizes it (the method declares
``quantizes_base_after_init``), the error is taken on the weight's own device, and the factors carry
``1 / s`` so that ``s B A`` is the rank-r truncation of the error for any alpha.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_lowrank_lora import attach_lora, lora_layers
from hf_lowrank_plugins import IncompatibleError, QuantizationSettings, is_quantized
from hf_lowrank_plugins.quantization import (
    quantize_model,
    requantize_under_adapter,
    roundtrip_4bit,
    with_heads_skipped,
)

from .config import LoftqConfig

logger = logging.getLogger(__name__)


@torch.no_grad()
def loftq_factors(
    weight: torch.Tensor, dequantized: torch.Tensor, rank: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A, B with ``s B A`` the rank-r truncated SVD of ``W - deq(Q(W))`` (both out x in), in fp32."""
    error = weight.float() - dequantized.float()
    U, S, Vh = torch.linalg.svd(error, full_matrices=False)
    root = (S[:rank] / scaling).sqrt()
    return root[:, None] * Vh[:rank], U[:, :rank] * root[None, :]


@torch.no_grad()
def loftq_alternations(
    weight: torch.Tensor, settings: QuantizationSettings, rank: int, scaling: float, iterations: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ's Algorithm 1 (as PEFT's ``loftq_init``): ``iterations`` rounds of quantizing ``W - s·B·A``
    (``W`` itself first) and taking A, B from what that quantization lost of W. Returns A, B and the
    weight the base is to be quantized from (``weight`` itself when ``iterations`` is 1), in
    ``weight``'s dtype, as the core will quantize it."""
    full = weight.float()
    quantize_from = weight
    A, B = loftq_factors(full, roundtrip_4bit(weight, settings), rank, scaling)
    for _ in range(iterations - 1):
        quantize_from = (full - scaling * (B @ A)).to(weight.dtype)
        A, B = loftq_factors(full, roundtrip_4bit(quantize_from, settings), rank, scaling)
    return A, B, quantize_from


@torch.no_grad()
def attach_loftq(
    model: nn.Module, config: LoftqConfig, quantization: QuantizationSettings | None, adapter: str = "default"
) -> PeftModel:
    """LoRA layers whose A, B repair each target's 4-bit error, then the base quantized to 4-bit by the core."""
    if quantization is None:
        raise IncompatibleError(
            "LoftQ measures what 4-bit quantization loses, so it needs the full-precision weights: load the model in "
            "16/32-bit and attach with load_in_4bit=True (hf-lowrank train --method loftq does); this model is "
            "already quantized"
            if is_quantized(model)
            else "LoftQ needs the 4-bit quantization settings (attach with load_in_4bit=True)"
        )
    settings = with_heads_skipped(quantization, model)
    peft_model = attach_lora(model, config)
    repaired = 0
    for name, layer in lora_layers(peft_model, adapter).items():
        base: Any = layer.get_base_layer()
        if type(base) is not nn.Linear and not isinstance(base, Conv1D):
            continue
        if any(name == skip or name.endswith("." + skip) for skip in settings.skip_modules):
            continue  # left in full precision by the core: nothing to repair
        stored = base.weight.detach()
        oriented = stored.t() if isinstance(base, Conv1D) else stored  # what the core quantizes: (out x in)
        A, B, quantize_from = loftq_alternations(
            oriented, settings, int(layer.r[adapter]), layer.scaling[adapter], int(config.loftq_iter)
        )
        layer.lora_A[adapter].weight.copy_(A.to(layer.lora_A[adapter].weight.dtype))
        layer.lora_B[adapter].weight.copy_(B.to(layer.lora_B[adapter].weight.dtype))
        if quantize_from is not oriented:  # the core quantizes W - s*B@A of the last round, not W
            base.weight.data = quantize_from.t().contiguous() if isinstance(base, Conv1D) else quantize_from
        repaired += 1
    logger.info(
        "LoftQ: %d layers start from the rank-r repair of their 4-bit error (%d alternations)",
        repaired,
        config.loftq_iter,
    )
    return requantize_under_adapter(peft_model, partial(quantize_model, settings=quantization))
