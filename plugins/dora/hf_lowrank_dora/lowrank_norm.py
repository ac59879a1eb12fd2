"""DoRA's row norms from low-rank pieces, without materialising the dense update.

DoRA scales each output row by ``m_i / ||W_i + s (B A)_i||`` (the norm detached, as the paper and
PEFT do). Every library builds the dense ``W + s B A`` (out x in) in each forward to take those
norms; PEFT also builds ``B A`` through an identity matrix (in x in). The same numbers need only

    ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T

that is ``||W_i||^2`` (cached: W is frozen; the cache follows the weight's version counter),
``W A^T`` (out x r) and the r x r Gram matrix of A: O(d r) memory per layer instead of O(d_out
d_in), under ``no_grad`` since the norm takes no gradient. :class:`LowRankDoraLinearLayer` is
PEFT's ``DoraLinearLayer`` with this forward; it holds the same parameter (the magnitude ``m``),
so saving, merging (PEFT's dense, one-off path) and plain-PEFT loading are unchanged.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from peft.tuners.lora.dora import DoraLinearLayer, cache_decorator
from peft.utils.integrations import dequantize_module_weight
from peft.utils.other import transpose
from torch import nn


class LowRankDoraLinearLayer(DoraLinearLayer):
    """PEFT's DoRA magnitude layer, computing the detached row norms from low-rank pieces."""

    def _row_norms_squared(self, weight: torch.Tensor) -> torch.Tensor:
        """``||W_i||^2``, recomputed only when the frozen weight changed (merge/unmerge, a new base)."""
        key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
        cached = getattr(self, "_w_sq", None)
        if cached is None or cached[0] != key:
            cached = (key, weight.pow(2).sum(dim=1))
            self._w_sq = cached
        return cached[1]

    @cache_decorator("weight-norm")
    def low_rank_weight_norm(
        self,
        base_layer: nn.Module,
        lora_A: nn.Module,
        lora_B: nn.Module,
        scaling: float,
        dtype: torch.dtype,
        adapter_name: str | None = None,
    ) -> torch.Tensor:
        """``||W_i + s (B A)_i||`` for every output row i, in ``dtype``, with no gradient."""
        with torch.no_grad():
            weight = transpose(dequantize_module_weight(base_layer), self.fan_in_fan_out).to(dtype)
            a = cast(torch.Tensor, lora_A.weight).to(dtype)
            b = cast(torch.Tensor, lora_B.weight).to(dtype)
            # 2s W A^T + s^2 B (A A^T), out x r, in one fused op; then the row-wise dot with B
            cross = torch.addmm(weight @ a.t(), b, a @ a.t(), beta=2 * scaling, alpha=scaling * scaling)
            squared = self._row_norms_squared(weight) + (b * cross).sum(dim=1)
            return squared.clamp_min_(0).sqrt_()

    def forward(
        self,
        x: torch.Tensor,
        *,
        lora_A: nn.Module,
        lora_B: nn.Module,
        scaling: float,
        base_layer: nn.Module,
        base_result: torch.Tensor | None = None,
        adapter_name: str = "default",
    ) -> Any:
        """PEFT's DoRA output (added to the base output), with the norms of :meth:`low_rank_weight_norm`."""
        magnitude = self.weight
        weight_norm = self.low_rank_weight_norm(base_layer, lora_A, lora_B, scaling, x.dtype, adapter_name=adapter_name)
        mag_norm_scale = (magnitude / weight_norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        if base_result is not None:
            bias = getattr(base_layer, "bias", None)
            if bias is not None:
                base_result = base_result - bias
        else:  # dropout changed x: the base output must be recomputed on it
            weight = transpose(dequantize_module_weight(base_layer), self.fan_in_fan_out).to(x.dtype)
            base_result = F.linear(x, weight)
        return scaled_by_norms(base_result, lora_result, mag_norm_scale, scaling)


def scaled_by_norms(base: torch.Tensor, lora: torch.Tensor, scale: torch.Tensor, scaling: float) -> torch.Tensor:
    """DoRA's output delta ``(m/n - 1) * base + (m/n) * s * lora``, ``scale = m/n`` per output feature.

    Two passes over the activations (PEFT's expression takes four). When a gradient is wanted it
    goes through :class:`_ScaledByNorms`, which keeps one activation-sized tensor for backward
    where autograd's graph of the expression keeps two.
    """
    if torch.is_grad_enabled() and (base.requires_grad or lora.requires_grad or scale.requires_grad):
        return cast(torch.Tensor, _ScaledByNorms.apply(base, lora, scale, scaling))
    return torch.addcmul(base * (scale - 1), lora, scale * scaling)


class _ScaledByNorms(torch.autograd.Function):
    """:func:`scaled_by_norms` with a hand-written backward.

    The gradient of ``scale`` is ``sum_t g_t * (base_t + s lora_t)``, so the sum ``base + s lora``
    is all backward needs besides ``scale``: saving it instead of ``base`` and ``lora`` halves what
    DoRA holds for backward beyond LoRA (one tokens x d_out tensor per layer instead of two).
    """

    @staticmethod
    def forward(ctx: Any, base: torch.Tensor, lora: torch.Tensor, scale: torch.Tensor, scaling: float) -> torch.Tensor:
        ctx.scaling = scaling
        ctx.save_for_backward(torch.add(base, lora, alpha=scaling), scale)
        return torch.addcmul(base * (scale - 1), lora, scale * scaling)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        combined, scale = ctx.saved_tensors
        grad_base = grad * (scale - 1) if ctx.needs_input_grad[0] else None
        grad_lora = grad * (scale * ctx.scaling) if ctx.needs_input_grad[1] else None
        grad_scale = None
        if ctx.needs_input_grad[2]:  # scale broadcasts over every leading dimension
            grad_scale = (grad * combined).sum(dim=tuple(range(grad.dim() - 1))).view_as(scale)
        return grad_base, grad_lora, grad_scale, None


def use_low_rank_norms(model: nn.Module) -> int:
    """Switch every DoRA linear layer of ``model`` to :class:`LowRankDoraLinearLayer`; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is DoraLinearLayer:
            module.__class__ = LowRankDoraLinearLayer
            count += 1
    return count
