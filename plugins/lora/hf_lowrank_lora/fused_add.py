"""Plain LoRA with its update added inside the rank-r product: ``addmm(W x, s A x, B^T)``.

PEFT's plain LoRA forward is ``result + lora_B(lora_A(dropout(x))) * scaling``: after the two
rank-r products it makes two more passes over a ``tokens x out`` tensor (the multiply by
``scaling``, even at ``s = 1``, then the sum), each allocating a new output, and backward makes
one more for the multiply's gradient. Here ``s`` multiplies the ``tokens x r`` hidden instead and
the sum happens in the second product's own GEMM (``torch.addmm`` with ``beta = 1``), whose
backward hands the incoming gradient to ``result`` unchanged. Same maths, up to float rounding
(``B (s h)`` against ``s (B h)``, and the GEMM's accumulation order).

The variant sits in PEFT's own per-layer ``lora_variant`` slot, as DoRA's does, so PEFT keeps
everything else: adapters by name, dropout, dtype casts, mixed-batch inference, merging (through
:meth:`FusedAddLoraVariant.merge_safe` and friends, which do exactly PEFT's plain merge). What is
saved is untouched: the adapter is a plain PEFT LoRA adapter.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from hf_lowrank_plugins.distributed import is_partitioned


class FusedAddLoraVariant(LoraVariant):
    """Plain LoRA whose ``s B A x`` is added to the base output by ``addmm``; see the module docstring."""

    @staticmethod
    def init(module: Any, adapter_name: str, **kwargs: Any) -> None:
        """Nothing to create: the variant uses PEFT's own ``lora_A``, ``lora_B`` and ``scaling``."""

    @staticmethod
    def merge_safe(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        """``W + s B A`` as a new tensor, as PEFT's plain safe merge computes it."""
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> None:
        """``W += s B A`` in place, as PEFT's plain merge does."""
        orig_weight.data += module.get_delta_weight(active_adapter)

    @staticmethod
    def unmerge(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        """``W - s B A``, the base weight again up to float rounding."""
        return orig_weight.data - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module: Any, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``result + s B A dropout(x)``, the sum taken by the GEMM of ``B`` (:func:`add_scaled_lora`)."""
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        x = module.lora_dropout[active_adapter](x)
        return add_scaled_lora(result, x, lora_A, lora_B, module.scaling[active_adapter])


def add_scaled_lora(
    result: torch.Tensor, x: torch.Tensor, lora_A: nn.Module, lora_B: nn.Module, scaling: float
) -> torch.Tensor:
    """``result + s * B A x`` as a new tensor: ``s`` scales the rank-r ``A x`` (r columns where PEFT
    scales ``out``) and ``torch.addmm`` adds ``B``'s product to ``result`` in the same GEMM.

    ``lora_A`` and ``lora_B`` are the bias-free ``nn.Linear`` factors PEFT creates. DoRA's forward
    builds its ``base + s lora`` with it too.
    """
    hidden = lora_A(x)
    if scaling != 1:
        hidden = hidden * scaling
    weight = cast(torch.Tensor, lora_B.weight)
    if is_partitioned(weight):
        # DeepSpeed ZeRO-3 gathers a partitioned weight only inside its module's own call
        return result + lora_B(hidden)
    # PEFT's sum promotes a lower-precision base output to the adapter's dtype and its caller casts
    # back; addmm needs one dtype, so the promotion is made explicit
    flat_result = result.reshape(-1, result.shape[-1]).to(hidden.dtype)
    summed = torch.addmm(flat_result, hidden.reshape(-1, hidden.shape[-1]), weight.t())
    return summed.view(*result.shape[:-1], summed.shape[-1])


def use_fused_add(model: nn.Module) -> int:
    """Give every plain LoRA adapter of ``model``'s PEFT linear layers :class:`FusedAddLoraVariant`;
    returns how many were switched.

    Covered: PEFT's ``Linear`` (``nn.Linear`` and GPT-2's ``Conv1D`` bases) and its bitsandbytes
    ``Linear4bit`` (QLoRA), whose forwards call the variant the same way. Left as PEFT has them:
    adapters that already have a variant (DoRA), adapters with a trained ``lora_bias`` (PEFT scales
    the bias with the product, which scaling the hidden would not), and layers of other classes
    (8-bit bases, embeddings, convolutions).
    """
    classes = _fused_classes()
    layers: list[Any] = [m for m in model.modules() if type(m) in classes]  # PEFT types its attributes loosely
    count = 0
    for layer in layers:
        for name in layer.lora_A:
            if name in layer.lora_variant or layer.lora_bias.get(name, False):
                continue
            layer.lora_variant[name] = FusedAddLoraVariant()
            count += 1
    return count


def _fused_classes() -> tuple[type, ...]:
    """PEFT's layer classes whose forward hands a plain adapter's sum to its variant as ``Linear``'s does."""
    try:
        from peft.tuners.lora.bnb import Linear4bit  # defined only when bitsandbytes has 4-bit layers
    except ImportError:
        return (PeftLoraLinear,)
    return (PeftLoraLinear, Linear4bit)
