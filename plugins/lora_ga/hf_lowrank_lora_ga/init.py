"""From gradient singular triplets to A, B (directions and scales), and the residual base W - s*B@A."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from peft.utils.other import transpose

from hf_lowrank_lora import LoraModule
from hf_lowrank_lora.resume import subtract_factors
from hf_lowrank_plugins.quantization import dequantized_4bit_weight, is_4bit_layer

from .accumulators import GradientFactors, seed_for

if TYPE_CHECKING:
    from .config import LoraGaConfig


def _indices(direction: str, r: int, variant: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the 2r singular directions taken by A and by B."""
    if direction == "ArB2r":
        return torch.arange(0, r), torch.arange(r, 2 * r)
    if direction == "A2rBr":
        return torch.arange(r, 2 * r), torch.arange(0, r)
    if direction == "ArBr":
        return torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    perm = torch.randperm(2 * r, generator=torch.Generator().manual_seed(seed))
    if variant == "peft":  # PEFT draws one index set and uses it for both factors
        return perm[:r], perm[:r]
    return perm[:r], perm[r:]  # official: disjoint halves


def _weight_singular_values(weight: torch.Tensor, q: int, seed: int, exact: bool) -> torch.Tensor:
    if exact:
        return torch.linalg.svdvals(weight.float())[:q]
    with torch.random.fork_rng(devices=[weight.device.index or 0] if weight.device.type == "cuda" else []):
        torch.manual_seed(seed)
        return torch.svd_lowrank(weight.float(), q=min(q, min(weight.shape)), niter=4)[1]


def lora_ga_factors(
    factors: GradientFactors,
    r: int,
    scaling: float,
    config: LoraGaConfig,
    weight: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r x in) and B (out x r) in fp32 from the gradient's top-2r triplets, per ``config``.

    ``config`` carries ``direction``, ``scale``, ``stable_gamma`` and ``variant`` (a
    :class:`LoraGaConfig`); ``scaling`` is the layer's LoRA scaling s; ``weight`` (out x in, LoRA
    orientation) is needed for ``scale="weight_svd"`` (its singular values by the SVD ``config.svd`` names); ``seed`` fixes the ``"random"`` direction
    and the weight SVD's projection.
    """
    U, S, Vh = factors.U.float(), factors.S.float(), factors.Vh.float()
    if U.shape[1] < 2 * r:
        raise ValueError(f"need 2r = {2 * r} gradient directions, got {U.shape[1]}")
    ia, ib = _indices(config.direction, r, config.variant, seed)
    A, B = Vh[ia], U[:, ib]
    out_features = U.shape[0]
    if config.variant == "peft":
        S_B = S[ib]
        B = B * S_B  # PEFT's variant keeps the gradient's singular values on B
        if config.scale == "stable":
            B = B * (out_features**0.25 / config.stable_gamma**0.5)
        elif config.scale == "weight_svd":
            assert weight is not None, "scale='weight_svd' needs the layer's weight"
            S_W = _weight_singular_values(weight, r, seed, config.svd == "exact")
            if S_B[0] > 0:
                B = B * (S_W[0] / S_B[0])
        elif config.scale == "gd":
            A, B = A / scaling, B / scaling
        return A.contiguous(), B.contiguous()
    if config.scale == "stable":
        # the output's scale depends only on d_out (official code), the same factor on A and B
        factor = out_features**0.25 / config.stable_gamma**0.5
        A, B = A * factor, B * factor
    elif config.scale == "gd":
        A, B = A / scaling, B / scaling
    elif config.scale == "weight_svd":
        assert weight is not None, "scale='weight_svd' needs the layer's weight"
        S_W = _weight_singular_values(weight, 4 * r, seed, config.svd == "exact") / scaling
        factor = S_W[:r].sqrt().mean()
        A, B = A * factor, B * factor
    return A.contiguous(), B.contiguous()


def base_weight(layer: LoraModule) -> torch.Tensor:
    """The layer's base weight in LoRA orientation (out x in) as stored (a view for transposed weights;
    a 4-bit weight dequantized)."""
    base = layer.get_base_layer()
    if is_4bit_layer(base):
        return dequantized_4bit_weight(base)
    return transpose(base.weight, getattr(layer, "fan_in_fan_out", False))


@torch.no_grad()
def set_initial_factors(
    layer: LoraModule, adapter: str, A: torch.Tensor, B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write A, B into the layer's LoRA weights (their dtype) and return them as stored.

    The residual is then computed from the stored (rounded) factors, as PEFT does, so that
    W_res + s*B@A reproduces W in the precision the forward pass actually uses.
    """
    lora_A, lora_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    lora_A.data.copy_(A.to(lora_A.dtype))
    lora_B.data.copy_(B.to(lora_B.dtype))
    return lora_A.detach(), lora_B.detach()


def init_layer(
    layer: LoraModule, adapter: str, factors: GradientFactors, config: LoraGaConfig, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA for one layer: A, B from ``factors``, W <- W - s*B@A; returns the stored (A, B)."""
    r, scaling = layer.r[adapter], layer.scaling[adapter]
    weight = base_weight(layer).detach() if config.scale == "weight_svd" else None
    A, B = lora_ga_factors(factors, r, scaling, config, weight=weight, seed=seed_for(config.ga_seed, name))
    A, B = set_initial_factors(layer, adapter, A, B)
    subtract_factors(layer, A, B, scaling)
    return A, B
