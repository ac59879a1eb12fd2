"""Magnitude masks for the frozen base: per layer, global across layers, and 2:4 semi-structured.

A mask is a bool tensor of the weight's shape, ``True`` where the weight is KEPT. Every function
keeps an exact count of weights (ties are broken by layer order, then position), so a requested
sparsity is met to the entry rather than approximately.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from hf_lowrank_plugins import ConfigError


def _kept(numel: int, sparsity: float) -> int:
    """Number of entries kept out of ``numel`` at ``sparsity`` (rounded to the nearest entry)."""
    return numel - int(round(sparsity * numel))


def check_sparsity(sparsity: float) -> None:
    """Raise :class:`ConfigError` unless ``0 <= sparsity < 1``."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity must be a number in [0, 1), got {sparsity!r}")


# Written by hand because torch.topk / torch.kthvalue need every magnitude in one tensor (plus int64
# indices: about 12 bytes per weight, 84 GB for a 7B model) and break ties arbitrarily. The magnitudes'
# float32 bit patterns, read as int32, sort like the magnitudes themselves, so a two-pass radix select
# (a 2^15-bin histogram of the high 16 bits, then 2^16 bins of the low 16 bits inside the one bucket
# that holds the threshold) finds the exact k-th largest magnitude one layer at a time, in memory
# bounded by the largest layer.
_HIGH_BINS, _LOW_BINS = 1 << 15, 1 << 16


def _magnitude_bits(weight: torch.Tensor) -> torch.Tensor:
    """``|weight|`` in float32, flattened and reinterpreted as int32 (same order as the magnitudes)."""
    return weight.detach().abs().float().flatten().view(torch.int32)


@dataclass(frozen=True)
class MagnitudeThreshold:
    """Which entries a magnitude ranking keeps: every ``|w| > value``, and of the entries equal to
    ``value`` the first ``ties`` in layer order, then position order (so the count is exact and the
    choice deterministic)."""

    bits: int  #: float32 bit pattern of the threshold magnitude
    ties: int

    @property
    def value(self) -> float:
        """The threshold magnitude."""
        return float(torch.tensor([self.bits], dtype=torch.int32).view(torch.float32))


def _select(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the ``rank``-th largest entry (1-based) and how many entries lie in higher bins."""
    at_or_above = counts.flip(0).cumsum(0).flip(0)  # entries in bin b or higher
    bin_ = int((at_or_above >= rank).nonzero().max())
    above = int(at_or_above[bin_ + 1]) if bin_ + 1 < len(counts) else 0
    return bin_, above


def magnitude_threshold(weights: Iterable[torch.Tensor], keep: int) -> MagnitudeThreshold | None:
    """The threshold that keeps exactly the ``keep`` largest magnitudes of all ``weights`` together.

    ``weights`` is iterated twice (one histogram pass each); ``None`` when ``keep`` is 0 (nothing kept).
    """
    weights = list(weights)
    if keep <= 0:
        return None
    high = torch.zeros(_HIGH_BINS, dtype=torch.int64)
    for w in weights:
        high += torch.bincount(_magnitude_bits(w) >> 16, minlength=_HIGH_BINS).cpu()
    high_bin, above_high = _select(high, keep)
    low = torch.zeros(_LOW_BINS, dtype=torch.int64)
    for w in weights:
        bits = _magnitude_bits(w)
        low += torch.bincount(bits[(bits >> 16) == high_bin] & 0xFFFF, minlength=_LOW_BINS).cpu()
    low_bin, above_low = _select(low, keep - above_high)
    return MagnitudeThreshold(bits=(high_bin << 16) | low_bin, ties=keep - above_high - above_low)


def threshold_masks(
    weights: Mapping[str, torch.Tensor], threshold: MagnitudeThreshold | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, mask)`` for every weight in order, each computed when asked for (one at a time)."""
    ties_left = threshold.ties if threshold is not None else 0
    for name, weight in weights.items():
        if threshold is None:
            yield name, torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
            continue
        bits = _magnitude_bits(weight)
        mask = bits > threshold.bits
        if ties_left > 0:
            tied = (bits == threshold.bits).nonzero().flatten()[:ties_left]
            mask[tied] = True
            ties_left -= len(tied)
        yield name, mask.view(weight.shape)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the ``(1 - sparsity) * numel`` largest-magnitude entries of ``weight`` (one layer)."""
    check_sparsity(sparsity)
    threshold = magnitude_threshold([weight], _kept(weight.numel(), sparsity))
    return next(threshold_masks({"weight": weight}, threshold))[1]


def iter_global_masks(weights: Mapping[str, torch.Tensor], sparsity: float) -> Iterator[tuple[str, torch.Tensor]]:
    """One magnitude ranking over all ``weights`` together, yielded layer by layer: the smallest
    ``sparsity`` fraction of all entries is pruned, so layers with small weights lose more than
    ``sparsity`` and others less. Extra memory: two histograms and one layer's magnitudes."""
    check_sparsity(sparsity)
    total = sum(w.numel() for w in weights.values())
    return threshold_masks(weights, magnitude_threshold(weights.values(), _kept(total, sparsity)))


def global_masks(weights: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Every mask of :func:`iter_global_masks` at once."""
    return dict(iter_global_masks(weights, sparsity))


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
    # a stable sort breaks ties by position (the README's rule); topk breaks them as its kernel happens to,
    # which differs between devices, so a GPU attach and a CPU resume could prune different weights
    idx = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def is_semi_structured(mask: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` consecutive entries along the last axis keeps at most ``n``."""
    if mask.shape[-1] % m:
        return False
    return bool((mask.reshape(-1, m).sum(-1) <= n).all())


def base_masks(
    weights: Mapping[str, torch.Tensor], sparsity: float, pattern: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, mask)`` for every weight in ``weights`` under ``pattern`` (``unstructured``, ``global``,
    ``2:4``), each mask computed when the caller reaches it, so only one is alive at a time.

    Every configuration error (including each 2:4 shape error, naming the first bad layer) is raised
    by this call, before any mask is computed.
    """
    check_sparsity(sparsity)
    if pattern == "unstructured":
        return ((n, magnitude_mask(w, sparsity)) for n, w in weights.items())
    if pattern == "global":
        return iter_global_masks(weights, sparsity)
    if pattern == "2:4":
        if sparsity != 0.5:
            raise ConfigError(f"2:4 sparsity is 0.5 by construction; got sparsity={sparsity}")
        for n, w in weights.items():
            if w.dim() != 2 or w.shape[-1] % 4:
                semi_structured_mask(w, name=n)  # raises with the layer's name and shape
        return ((n, semi_structured_mask(w, name=n)) for n, w in weights.items())
    raise ConfigError(f"sparsity_pattern must be 'unstructured', 'global' or '2:4', got {pattern!r}")
