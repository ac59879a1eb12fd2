"""Magnitude masks for the frozen base: per layer, global across layers, and 2:4 semi-structured.

A mask is a bool tensor of the weight's shape, ``True`` where the weight is KEPT. Every function
keeps an exact count of weights (ties are broken by position through ``torch.topk`` on the flat
magnitudes), so a requested sparsity is met to the entry rather than approximately.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hf_lowrank_plugins import ConfigError


def _kept(numel: int, sparsity: float) -> int:
    """Number of entries kept out of ``numel`` at ``sparsity`` (rounded to the nearest entry)."""
    return numel - int(round(sparsity * numel))


def check_sparsity(sparsity: float) -> None:
    """Raise :class:`ConfigError` unless ``0 <= sparsity < 1``."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity must be a number in [0, 1), got {sparsity!r}")


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the ``(1 - sparsity) * numel`` largest-magnitude entries of ``weight`` (one layer)."""
    check_sparsity(sparsity)
    flat = weight.detach().abs().flatten().float()
    keep = _kept(flat.numel(), sparsity)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=weight.device)
    if keep > 0:
        mask[torch.topk(flat, keep, sorted=False).indices] = True
    return mask.view(weight.shape)


def global_masks(weights: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One magnitude ranking over all ``weights`` together: the smallest ``sparsity`` fraction of all
    entries is pruned, so layers with small weights lose more than ``sparsity`` and others less."""
    check_sparsity(sparsity)
    names = list(weights)
    flat = torch.cat([weights[n].detach().abs().flatten().float().cpu() for n in names])
    keep = _kept(flat.numel(), sparsity)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if keep > 0:
        mask[torch.topk(flat, keep, sorted=False).indices] = True
    out, start = {}, 0
    for n in names:
        numel = weights[n].numel()
        out[n] = mask[start : start + numel].view(weights[n].shape).to(weights[n].device)
        start += numel
    return out


def semi_structured_mask(weight: torch.Tensor, n: int = 2, m: int = 4, name: str = "weight") -> torch.Tensor:
    """N:M mask (default 2:4): in every group of ``m`` consecutive inputs of a row keep the ``n``
    largest magnitudes. Groups run along the input dimension (last axis) because that is the
    reduction axis of ``x @ W.T``, which is what sparse tensor cores (and
    ``torch.sparse.to_sparse_semi_structured``) compress."""
    if weight.dim() != 2:
        raise ConfigError(f"{n}:{m} sparsity needs a 2-D weight, {name} has shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if cols % m:
        raise ConfigError(
            f"{n}:{m} sparsity groups {m} consecutive inputs, but {name} has {cols} inputs (shape {rows}x{cols}), "
            f"not divisible by {m}; use sparsity_pattern='unstructured' or exclude that layer (exclude_modules)"
        )
    groups = weight.detach().abs().float().reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=-1, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def is_semi_structured(mask: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` consecutive entries along the last axis keeps at most ``n``."""
    if mask.shape[-1] % m:
        return False
    return bool((mask.reshape(-1, m).sum(-1) <= n).all())


def base_masks(weights: Mapping[str, torch.Tensor], sparsity: float, pattern: str) -> dict[str, torch.Tensor]:
    """Masks for every weight in ``weights`` under ``pattern`` (``unstructured``, ``global``, ``2:4``).

    All 2:4 shape errors are raised before any mask is computed, naming the first bad layer.
    """
    check_sparsity(sparsity)
    if pattern == "unstructured":
        return {n: magnitude_mask(w, sparsity) for n, w in weights.items()}
    if pattern == "global":
        return global_masks(weights, sparsity)
    if pattern == "2:4":
        if sparsity != 0.5:
            raise ConfigError(f"2:4 sparsity is 0.5 by construction; got sparsity={sparsity}")
        for n, w in weights.items():
            if w.dim() != 2 or w.shape[-1] % 4:
                semi_structured_mask(w, name=n)  # raises with the layer's name and shape
        return {n: semi_structured_mask(w, name=n) for n, w in weights.items()}
    raise ConfigError(f"sparsity_pattern must be 'unstructured', 'global' or '2:4', got {pattern!r}")
