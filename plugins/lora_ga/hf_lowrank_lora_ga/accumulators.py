"""The gradient sums of the streaming estimate and their factorisation: the exact sum (kept as its
per-batch factors while they are smaller), the two-sided sketch, and the truncated SVD of either."""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from hf_lowrank_plugins import LowRankError


def factors_outgrow_sum(rows: int, m: int, n: int) -> bool:
    """Whether ``rows`` tokens of an ``m x n`` layer's factors, ``rows x (m + n)`` entries, are at least
    its sum G's ``m x n``: from then on :class:`FullAccumulator` holds G instead."""
    return rows * (m + n) >= m * n


def seed_for(*parts: Any) -> int:
    """A stable 31-bit seed from ``parts`` (same on every process and run, unlike ``hash``)."""
    return zlib.crc32(":".join(map(str, parts)).encode()) & 0x7FFFFFFF


@dataclass
class GradientFactors:
    """Top singular triplets of a layer's averaged gradient, G ~ U @ diag(S) @ Vh (m x n, LoRA orientation)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


class Accumulator:
    """Running sum of one layer's per-batch gradients (or of their sketch), in fp32."""

    def fold(self, x: torch.Tensor, g: torch.Tensor) -> None:  # pragma: no cover - interface
        """Add one batch's gradient ``g^T x`` (``x``: the layer's inputs, ``g``: dL/dy, rows = tokens)."""
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:  # pragma: no cover - interface
        """The tensors that hold the sum (what DDP ranks all-reduce)."""
        raise NotImplementedError


class FullAccumulator(Accumulator):
    """Exact ``G = sum_b (dL_b/dy)^T x`` (m x n): the factors while they are smaller, then G in fp32."""

    def __init__(self, m: int, n: int, device: torch.device) -> None:
        self.m, self.n, self.device = m, n, device
        self.factors: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] = []
        self.rows = 0
        self._G: torch.Tensor | None = None
        self.compacted = 0  # factors already moved by compact_factors

    def fold(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """Add one batch's gradient ``g^T x`` (tokens flattened): keep the pair, or add it to G."""
        if self._G is None and not factors_outgrow_sum(self.rows + x.shape[0], self.m, self.n):
            # x as the layer saw it (layers fed the same input share it), with the versions to prove it unchanged
            self.factors.append((x, g, (x._version, g._version)))
            self.rows += x.shape[0]
            return
        self.dense().addmm_(g.float().t(), x.float())

    def checked_factors(self) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
        """The kept pairs, each proven unchanged since it was folded (by its version counters)."""
        for x, g, versions in self.factors:
            if (x._version, g._version) != versions:
                raise LowRankError(
                    "LoRA-GA kept a layer's input and output gradient to sum later, but the model changed one "
                    "in place after the pass; use estimator='sketch', which folds each batch at once"
                )
        return self.factors

    def dense(self) -> torch.Tensor:
        """G itself: the kept pairs summed in the order they came (then dropped)."""
        if self._G is None:
            self._G = torch.zeros(self.m, self.n, device=self.device, dtype=torch.float32)
            for x, g, _ in self.checked_factors():
                self._G.addmm_(g.float().t(), x.float())
            self.factors = []
        return self._G

    def tensors(self) -> list[torch.Tensor]:
        """The tensors to all-reduce across ranks."""
        return [self.dense()]


def compact_factors(accumulators: Iterable[Accumulator], device: torch.device) -> int:
    """Move the pairs the sums kept since the last call into one buffer of their own; returns its bytes.

    Called on a CPU after each batch's backward but the last. The kept ``x`` and ``dL/dy`` were
    allocated among that batch's activations, and glibc's heap, holding them in the middle of the
    freed space, fits the next batch's activations only partly around them. Copied out into one block
    (above glibc's mmap threshold, so outside the heap) and the heap's free pages handed back, the
    next forward lays its activations out as the first did. SmolLM2-135M, two batches of 2 x 64
    tokens, one group: the pass peaked at 1,586 MiB without this and 1,522-1,525 MiB with it,
    against 1,450 MiB for a LoRA training step; the copy (118 MiB) and the trim took 55 ms. An input
    that layers share (q/k/v's) is copied once; every copy starts 64-byte aligned, as the
    allocator's own tensors do.
    """
    pending = [
        (acc, index)
        for acc in accumulators
        if isinstance(acc, FullAccumulator)
        for index in range(acc.compacted, len(acc.checked_factors()))
    ]
    unique: dict[tuple[int, tuple[int, ...], torch.dtype], torch.Tensor] = {}
    for acc, index in pending:
        for tensor in acc.factors[index][:2]:
            unique.setdefault((tensor.data_ptr(), tuple(tensor.shape), tensor.dtype), tensor)
    offsets, total = {}, 0
    for key, tensor in unique.items():
        offsets[key] = total
        total += -(-tensor.numel() * tensor.element_size() // 64) * 64
    if not total:
        return 0
    block = torch.empty(total, dtype=torch.uint8, device=device)
    copies = {}
    for key, tensor in unique.items():
        start = offsets[key]
        view = block[start : start + tensor.numel() * tensor.element_size()].view(tensor.dtype).view(tensor.shape)
        copies[key] = view.copy_(tensor)
    for acc, index in pending:
        x, g, _ = acc.factors[index]
        x, g = (copies[(t.data_ptr(), tuple(t.shape), t.dtype)] for t in (x, g))
        acc.factors[index] = (x, g, (x._version, g._version))
    for acc in {id(acc): acc for acc, _ in pending}.values():
        acc.compacted = len(acc.factors)
    return total


class SketchAccumulator(Accumulator):
    """Two-sided randomized sketch ``Y = G Omega`` (m x k), ``Z = Psi G`` (l x n) of the running sum."""

    def __init__(self, omega: torch.Tensor, psi: torch.Tensor) -> None:
        self.omega, self.psi = omega, psi  # shared by layers of equal shape: never written
        self.Y = torch.zeros(psi.shape[1], omega.shape[1], device=omega.device, dtype=torch.float32)
        self.Z = torch.zeros(psi.shape[0], omega.shape[0], device=omega.device, dtype=torch.float32)

    def fold(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """Add one batch's ``g^T x`` to both sketches, never forming the m x n product."""
        x, g = x.float(), g.float()
        self.Y.addmm_(g.t(), x @ self.omega)
        self.Z.addmm_((g @ self.psi.t()).t(), x)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors to all-reduce across ranks."""
        return [self.Y, self.Z]


def sketch_sizes(m: int, n: int, r: int, sketch_rank: int | None) -> tuple[int, int]:
    """(k, l): range-sketch rank k = min(sketch_rank or 4r, m, n), co-range rows l = min(2k + 1, m)."""
    k = min(sketch_rank or 4 * r, m, n)
    return k, min(2 * k + 1, m)


class SketchMatrices:
    """Seeded Gaussian test matrices, one per (dimension, width): identical on every rank and run."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed, self.device = seed, device
        self.cache: dict[tuple[int, int, str], torch.Tensor] = {}

    def get(self, rows: int, cols: int, tag: str) -> torch.Tensor:
        """The seeded Gaussian test matrix of this shape and role, drawn once."""
        key = (rows, cols, tag)
        if key not in self.cache:
            gen = torch.Generator().manual_seed(seed_for(self.seed, *key))
            self.cache[key] = torch.randn(rows, cols, generator=gen).div_(math.sqrt(cols)).to(self.device)
        return self.cache[key]


def truncated_svd(G: torch.Tensor, k: int, svd: str, niter: int, seed: int) -> GradientFactors:
    """The top ``k`` singular triplets of the exact sum ``G`` (``svd="exact"`` or seeded randomized)."""
    if svd == "exact":
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[G.device.index or 0] if G.device.type == "cuda" else []):
            torch.manual_seed(seed)  # svd_lowrank takes no generator; every rank must draw the same projection
            U, S, V = torch.svd_lowrank(G, q=min(2 * k, min(G.shape)), niter=niter)
        Vh = V.t()
    return GradientFactors(U[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].contiguous())


def sketch_svd(acc: SketchAccumulator, scale: float, k: int) -> GradientFactors:
    """Top-k triplets of the sketched G: Q = orth(Y), X = (Psi Q)^+ Z, G ~ Q X."""
    Y, Z = acc.Y * scale, acc.Z * scale
    Q, _ = torch.linalg.qr(Y)
    X = torch.linalg.lstsq(acc.psi @ Q, Z).solution
    Ux, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return GradientFactors((Q @ Ux)[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].contiguous())
