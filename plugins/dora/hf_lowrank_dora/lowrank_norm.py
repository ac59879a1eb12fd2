"""DoRA's row norms from low-rank pieces, without materialising the dense update.

DoRA scales each output row by ``m_i / ||W_i + s (B A)_i||`` (the norm detached, as the paper and
PEFT do). Every library builds the dense ``W + s B A`` (out x in) in each forward to take those
norms; PEFT also builds ``B A`` through an identity matrix (in x in). The same numbers need only

    ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T

that is ``||W_i||^2`` (cached: W is frozen; the cache follows the weight's version counter),
``W A^T`` (out x r) and the r x r Gram matrix of A: O(d r) memory per layer instead of O(d_out
d_in), under ``no_grad`` since the norm takes no gradient. :class:`LowRankDoraLinearLayer` is
PEFT's ``DoraLinearLayer`` with this norm, at every step and for the initial magnitude; it holds
the same parameter (the magnitude ``m``), so saving, merging (PEFT's dense, one-off path) and
plain-PEFT loading are unchanged.
:class:`LowRankDoraLinearVariant` is PEFT's DoRA variant with a forward that uses it and computes
the whole output in fewer passes (:func:`dora_output`).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from peft.tuners.lora.dora import DoraLinearLayer, cache_decorator
from peft.tuners.lora.variants import DoraLinearVariant
from peft.utils.integrations import dequantize_module_weight, gather_params_ctx
from torch import nn
from torch.autograd.function import once_differentiable

from hf_lowrank_lora import (
    add_scaled_lora,
    has_hooks,
    lora_linear_backward,
    lora_linear_forward,
    unflatten_output,
    without_autocast,
)
from hf_lowrank_plugins.distributed import is_partitioned
from hf_lowrank_plugins.quantization import dequantized_4bit_weight


def _dense_weight(base_layer: nn.Module, fan_in_fan_out: bool) -> torch.Tensor:
    """The base layer's weight as a dense ``out x in`` tensor.

    What PEFT's ``transpose(dequantize_module_weight(layer), fan_in_fan_out)`` gives, without the
    steps ``torch.compile`` cannot trace, each a graph break in every DoRA layer: the dequantizer
    inspects type names even for a plain parameter, and ``transpose`` wraps a transposed parameter
    in a new ``nn.Parameter`` (GPT-2's ``Conv1D`` stores ``in x out``).
    """
    weight: Any = base_layer.weight  # a Parameter, or a quantized one carrying its quantization state
    if type(weight).__name__ == "Params4bit":  # bitsandbytes 4-bit, as PEFT's helper dequantizes it
        weight = dequantized_4bit_weight(base_layer)
    elif type(weight) is not nn.Parameter or hasattr(base_layer, "W_q"):  # other quantizations (W_q: HQQ's)
        weight = dequantize_module_weight(base_layer)
    return cast(torch.Tensor, weight.T if fan_in_fan_out else weight)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype DoRA's row norms of a ``dtype`` forward are summed in: fp32 for a 16-bit one.

    A squared row norm above 65504 (a row of norm 256) is infinite in fp16, which would zero that
    output row silently, and bf16 sums lose digits; PEFT's ``linalg.norm`` accumulates in fp32 as well.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class LowRankDoraLinearLayer(DoraLinearLayer):
    """PEFT's DoRA magnitude layer, computing the detached row norms (each step's and the initial
    magnitudes) from low-rank pieces."""

    def row_norms_squared(
        self, base_layer: nn.Module, dtype: torch.dtype, dense_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``||W_i||^2`` of the frozen base weight, summed in :func:`accumulation_dtype` of ``dtype`` and
        kept until that weight changes; ``dense_weight`` is that weight already dense (``out x in``),
        when the caller has it.

        The key is the base layer's own weight (storage and version counter), not the tensor the
        forward derives from it: a 4-bit weight is dequantized afresh on every call. Inside a
        ``torch.compile`` graph the key cannot be read without a graph break in every layer (DoRA
        compiled ran at 0.71x its eager speed for them), and a cache that is not checked could go
        stale silently, so a compiled forward computes the norms from the weight: one more read of
        it per step. So does a forward whose base weight is trained: optimizers that write through
        ``.data`` or raw pointers (bitsandbytes' 8-bit ones, DeepSpeed's) leave the version alone.
        """
        source = cast(torch.Tensor, base_layer.weight)
        dtype = accumulation_dtype(dtype)
        if torch.compiler.is_compiling() or source.requires_grad:
            return self._base_row_norms_squared(base_layer, dtype, dense_weight)
        key = (source.data_ptr(), source._version, tuple(source.shape), dtype)
        cached = getattr(self, "_w_sq", None)
        if cached is None or cached[0] != key:
            cached = (key, self._base_row_norms_squared(base_layer, dtype, dense_weight))
            self._w_sq = cached
        return cached[1]

    def _base_row_norms_squared(
        self, base_layer: nn.Module, dtype: torch.dtype, weight: torch.Tensor | None
    ) -> torch.Tensor:
        with torch.no_grad(), without_autocast(cast(torch.Tensor, base_layer.weight).device.type):
            if weight is None:
                weight = _dense_weight(base_layer, self.fan_in_fan_out)
            weight = weight.to(dtype)  # the caller's dense weight is widened, not dequantized again
            # row-wise dot products: no out x in temporary of squares (see update_layer)
            return torch.einsum("ij,ij->i", weight, weight)

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
        """``||W_i + s (B A)_i||`` for every output row i, in ``dtype`` (summed in fp32 for a 16-bit
        ``dtype``), with no gradient."""
        return self._norms(
            base_layer, cast(torch.Tensor, lora_A.weight), cast(torch.Tensor, lora_B.weight), scaling, dtype
        )

    def _norms(
        self, base_layer: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float, dtype: torch.dtype
    ) -> torch.Tensor:
        compute = accumulation_dtype(dtype)
        weight = _dense_weight(base_layer, self.fan_in_fan_out)
        # autocast would run the products, and with them the sums, in 16 bits again
        with torch.no_grad(), without_autocast(weight.device.type):
            if weight.dtype == a.dtype != compute:
                # all 16-bit: W A^T in that dtype (the GEMM accumulates in fp32; only its out x r result
                # is rounded), where widening W would make an out x in copy of it
                weight_a = F.linear(weight, a).to(compute)
            else:
                weight = weight.to(compute)
                weight_a = F.linear(weight, a.to(compute))
            a, b = a.to(compute), b.to(compute)
            # 2s W A^T + s^2 B (A A^T), out x r, in one fused op; then the row-wise dot with B
            cross = torch.addmm(weight_a, b, F.linear(a, a), beta=2 * scaling, alpha=scaling * scaling)
            # a 4-bit weight dequantized once a call, where a compiled forward also takes ||W_i||^2 from it
            squared = torch.linalg.vecdot(b, cross).add_(self.row_norms_squared(base_layer, compute, weight))
            return squared.clamp_min_(0).sqrt_().to(dtype)

    def update_layer(
        self,
        *,
        base_layer: nn.Module,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        place_on_cpu: bool = False,
    ) -> None:
        """PEFT's initial magnitude ``m = ||W + s B A||`` per row, from the same low-rank pieces.

        PEFT builds the dense ``B A`` and ``W + s B A`` of every layer for it; freed one layer at a
        time, those temporaries still piled up in glibc's heap on some runs (a DoRA attach to a
        0.38B model peaked at 3.1-4.1 GB against 1.8 GB on others, and a training peak of 2.5 GB).
        The result has PEFT's dtype (the base weight's promoted with the adapter's), summed in fp32
        for 16-bit types and rounded once, as every forward's norms are (:meth:`low_rank_weight_norm`).
        With ``B = 0`` the magnitude is bit for bit the norm the first forward computes in that dtype,
        so the adapted model equals its base exactly at initialisation, in 16 bits too.
        """
        base_weight = cast(torch.Tensor, base_layer.weight)
        dtype = torch.promote_types(base_weight.dtype, lora_A.dtype)
        if not dtype.is_floating_point:  # a 4-bit weight: its dequantized values are in the adapter's dtype
            dtype = lora_A.dtype
        with gather_params_ctx(base_layer.parameters()):
            device = base_weight.device
            magnitude = self._norms(base_layer, lora_A.to(device), lora_B.to(device), scaling, dtype)
        self.weight = nn.Parameter(magnitude.to("cpu") if place_on_cpu else magnitude, requires_grad=True)


class LowRankDoraLinearVariant(DoraLinearVariant):
    """PEFT's DoRA variant for linear layers, returning the whole adapted output in one step.

    PEFT's variant adds a delta ``(m/n - 1) * base + (m/n) * s * lora`` to the base output; this one
    returns ``(m/n) * (base - bias + s * lora) + bias`` (:func:`dora_output`): the same output in
    fewer passes over the activations, keeping one activation-sized tensor for backward where
    PEFT's keeps two. Merging and unmerging are PEFT's; the initial magnitude is the layer's
    (:meth:`LowRankDoraLinearLayer.update_layer`).
    """

    @staticmethod
    def fused_forward(module: Any, active_adapter: str, x: torch.Tensor) -> torch.Tensor | None:
        """The whole layer as one autograd node (:class:`DoraLinearFunction`), or ``None`` (PEFT's call)
        for a magnitude in another dtype or partitioned; asked by ``hf_lowrank_lora.FusedLoraLinear``
        only where nothing needs the base layer's own call."""
        dora = module.lora_magnitude_vector[active_adapter]
        magnitude = cast(torch.Tensor, dora.weight)
        if magnitude.dtype != x.dtype or is_partitioned(magnitude):
            return None
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        scaling, base = module.scaling[active_adapter], module.base_layer
        norm = dora.low_rank_weight_norm(base, lora_A, lora_B, scaling, x.dtype, adapter_name=active_adapter)
        output = DoraLinearFunction.apply(
            x, base.weight, base.bias, lora_A.weight, lora_B.weight, magnitude, scaling, norm
        )
        return unflatten_output(cast(torch.Tensor, output), x)

    @staticmethod
    def forward(module: Any, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The layer's output with adapter ``active_adapter`` applied on top of ``result`` (PEFT's contract);
        PEFT's own variant where hooks on the adapter's modules need PEFT's calls of them."""
        dora = module.lora_magnitude_vector[active_adapter]
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        if any(has_hooks(m) for m in (dora, lora_A, lora_B)):
            return DoraLinearVariant.forward(module, active_adapter, x, result, **kwargs)
        scaling = module.scaling[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        base_layer = module.get_base_layer()
        norm = dora.low_rank_weight_norm(base_layer, lora_A, lora_B, scaling, x.dtype, adapter_name=active_adapter)
        if isinstance(dropout, nn.Identity) or not module.training:
            combined = add_scaled_lora(result, x, lora_A, lora_B, scaling, dora.weight.dtype)
            return dora_output(combined, dora.weight, norm, getattr(base_layer, "bias", None))
        # dropout changes x, so (as PEFT does) the magnitude scales the base output recomputed on it
        x = dropout(x)
        base = F.linear(x, _dense_weight(base_layer, dora.fan_in_fan_out).to(x.dtype))
        combined = add_scaled_lora(base, x, lora_A, lora_B, scaling, dora.weight.dtype)
        return result + (dora_output(combined, dora.weight, norm) - base)


def dora_output(
    combined: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA's output ``(m/n) * (c - bias) + bias`` from ``c = base + s lora``.

    ``base`` is the base layer's output (``bias`` included), ``n`` the detached row norms; ``c`` comes
    from :func:`hf_lowrank_lora.add_scaled_lora`, whose GEMM takes the sum. PEFT adds
    ``(m/n - 1) * (base - bias) + (m/n) * s lora`` to ``base``, and autograd keeps both ``base`` and
    ``lora`` for the magnitude's gradient; in this form it keeps only ``c - bias`` (the gradient of
    ``m/n`` is ``sum_t g_t (c_t - bias)``), one tokens x d_out tensor per layer instead of two, and the
    rest is one pass over the activations forward (two with a bias) and two backward instead of six
    and eight (:func:`_rescaled`).
    """
    return _rescaled(combined, magnitude, norm, bias)[0]


def _rescaled(
    combined: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m/n) (c - bias) + bias``, computed as ``c + ((m - n)/n) (c - bias)``, and ``c - bias`` (what the
    magnitude's gradient needs).

    The correction's rounding errors are relative to the correction, small while ``m`` is near ``n``,
    where ``(m/n) c`` rounds ``m/n`` and the product: in 16 bits that put layers beyond 1.5x PEFT's own
    error against float64 (PEFT adds a correction to the base output too). With ``m = n`` it is exactly ``c``, so an
    adapter at initialisation returns the base layer's output bit for bit, bias included.
    """
    centered = combined if bias is None else combined - bias
    return torch.addcmul(combined, centered, (magnitude - norm) / norm), centered


class DoraLinearFunction(torch.autograd.Function):
    """DoRA's layer ``(m/n) * (x W^T + s (x A^T) B^T) + b`` for a frozen ``W``/``b`` as one autograd node.

    ``n`` is the detached row norm (computed outside, without gradient). Forward builds
    ``c = x W^T + b + s h B^T`` (``h = x A^T``) in one buffer by ``addmm_`` (the bias inside, as the
    base layer's own GEMM adds it, so a 16-bit ``c`` is rounded where the base output is), rescales it
    as :func:`dora_output` does and keeps ``x``, ``h`` and ``c - b``. Backward is LoRA's
    (``hf_lowrank_lora.lora_linear_backward``) with the incoming gradient scaled by ``m/n``
    (``g_k = g * m/n``): ``g_k^T (s h)`` for ``B``, ``(s g_k B)^T x`` for ``A``, and the input's gradient
    ``g_k W + (s g_k B) A`` by one ``addmm_``; the magnitude's gradient is ``sum_t g_t (c_t - b) / n``,
    the order autograd takes it in :func:`dora_output`. On SmolLM2-135M (2 x 64
    tokens, a 2-core CPU) a step takes 0.96x the variant path's (``benchmarks/paired_steps.py``,
    ``ours:dora`` against ``ours:dora_variant_only``; round by round 0.82-1.33x, so a few percent).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        magnitude: torch.Tensor,
        scaling: float,
        norm: torch.Tensor,
    ) -> torch.Tensor:
        """The layer's output; see the class docstring."""
        flat_x = x.reshape(-1, x.shape[-1])
        combined, hidden = lora_linear_forward(flat_x, weight, bias, lora_A, lora_B, scaling)
        out, centered = _rescaled(combined, magnitude, norm, bias)
        ctx.save_for_backward(flat_x, weight, lora_A, lora_B, hidden, centered, magnitude / norm, norm)
        ctx.scaling, ctx.input_shape = scaling, x.shape
        return out  # tokens x out, shaped outside the node (hf_lowrank_lora.unflatten_output)

    @staticmethod
    @once_differentiable  # saved x, hidden and c carry no graph: a second derivative would be silently wrong
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Gradients of ``x``, ``lora_A``, ``lora_B`` and the magnitude (none for the frozen base or the norm)."""
        flat_x, weight, lora_A, lora_B, hidden, centered, scale, norm = ctx.saved_tensors
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        needs = ctx.needs_input_grad
        grad_magnitude = (flat_grad * centered).sum(0) / norm if needs[5] else None
        grad_x, grad_A, grad_B = lora_linear_backward(
            flat_grad * scale, flat_x, weight, lora_A, lora_B, hidden, ctx.scaling, (needs[0], needs[3], needs[4])
        )
        grad_x = grad_x.view(ctx.input_shape) if grad_x is not None else None
        return grad_x, None, None, grad_A, grad_B, grad_magnitude, None, None


def use_low_rank_norms(model: nn.Module) -> int:
    """Switch every DoRA linear layer of ``model`` to :class:`LowRankDoraLinearLayer` and its variant to
    :class:`LowRankDoraLinearVariant`; returns how many adapters were switched.

    Each layer's ``||W_i||^2`` is computed here, before training: computed lazily in the first
    forward, these small tensors that live for the whole run would sit between the activations in
    the allocator's heap, which then cannot reuse or hand back the space around them (measured:
    620 MiB more resident during training of a 0.38B model than with the norms computed up front).
    Under DeepSpeed ZeRO-3 a partitioned weight is left to the first forward, which gathers it.
    """
    count = 0
    for module in model.modules():
        variants = getattr(module, "lora_variant", None)
        if not isinstance(variants, dict):
            continue
        for name, variant in variants.items():
            dora = module.lora_magnitude_vector[name] if type(variant) is DoraLinearVariant else None  # type: ignore[index]  # nn.Module.__getattr__ types a transformers/PEFT attribute as Tensor | Module
            if type(dora) not in (DoraLinearLayer, LowRankDoraLinearLayer):
                continue
            dora.__class__ = LowRankDoraLinearLayer
            variants[name] = LowRankDoraLinearVariant()
            base_layer = module.get_base_layer()  # type: ignore[operator]  # nn.Module.__getattr__ types a transformers/PEFT attribute as Tensor | Module
            if not is_partitioned(base_layer.weight):  # the forward sees x in the adapter's dtype
                cast(LowRankDoraLinearLayer, dora).row_norms_squared(base_layer, module.lora_A[name].weight.dtype)  # type: ignore[index, union-attr]  # nn.Module.__getattr__ types a transformers/PEFT attribute as Tensor | Module
            count += 1
    return count
