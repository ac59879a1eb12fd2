"""How many passes the exact estimate takes: the bytes its sums hold per layer, and the fewest layer
groups whose sums fit beside what a pass holds anyway (see :mod:`.gradient`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .accumulators import factors_outgrow_sum

#: By default one layer group's fp32 accumulators may take this share of the memory in use.
ACCUMULATOR_SHARE = 0.1


def batch_rows(batches: list[dict[str, Any]]) -> int | None:
    """The rows (tokens) a layer's input has over all ``batches``: per batch, the largest
    ``batch x sequence`` among its tensors of two or more dimensions; ``None`` when a batch has none."""
    total = 0
    for batch in batches:
        sizes = [v.shape[0] * v.shape[1] for v in batch.values() if torch.is_tensor(v) and v.dim() >= 2]
        if not sizes:
            return None
        total += max(sizes)
    return total


@dataclass(frozen=True)
class LayerInput:
    """What one layer's exact sum (:class:`FullAccumulator`) holds per token, as seen in a forward."""

    out_features: int
    in_features: int
    input_key: int  # the input's storage: layers fed the same tensor (q/k/v, gate/up) keep it once
    input_row_bytes: int  # one row of x in the dtype the layer saw
    grad_row_bytes: int  # one row of dL/dy, in the output's dtype

    @classmethod
    def of(cls, x: torch.Tensor, output: torch.Tensor) -> LayerInput:
        """The layer that read ``x`` and wrote ``output``."""
        n, m = x.shape[-1], output.shape[-1]
        return cls(m, n, x.untyped_storage().data_ptr(), n * x.element_size(), m * output.element_size())

    @classmethod
    def assumed(cls, m: int, n: int, key: int) -> LayerInput:
        """An ``m x n`` layer not seen in a forward: fp32 rows and an input of its own (``key``)."""
        return cls(m, n, key, 4 * n, 4 * m)

    def is_dense(self, rows: int | None) -> bool:
        """Whether after ``rows`` tokens the sum is fp32 G (:meth:`FullAccumulator.fold`'s switch);
        ``None``: unknown tokens, counted as G."""
        return rows is None or factors_outgrow_sum(rows, self.out_features, self.in_features)


def held_bytes(group: Iterable[str], inputs: dict[str, LayerInput], rows: int | None) -> int:
    """What the sums of the layers in ``group`` hold after ``rows`` tokens: fp32 G for a layer past
    :class:`FullAccumulator`'s switch, else its rows of ``dL/dy`` and of its input, an input that
    several layers of the group read counted once."""
    total, kept_inputs = 0, {}
    for name in group:
        layer = inputs[name]
        if layer.is_dense(rows):
            total += 4 * layer.out_features * layer.in_features
        else:
            assert rows is not None  # for mypy: is_dense(None) is True
            total += rows * layer.grad_row_bytes
            kept_inputs[layer.input_key] = rows * layer.input_row_bytes
    return total + sum(kept_inputs.values())


def accumulator_bytes(m: int, n: int, rows: int | None) -> int:
    """What a :class:`FullAccumulator` of an ``m x n`` layer holds after ``rows`` tokens, at most (fp32
    factors, the layer's input counted as its own): the factors or, once larger, G (:func:`held_bytes`)."""
    return held_bytes(["layer"], {"layer": LayerInput.assumed(m, n, 0)}, rows)


def layer_groups(inputs: dict[str, LayerInput], rows: int | None, count: int) -> list[list[str]]:
    """``inputs``' layers (in model order) in ``count`` contiguous groups of about equal sums after ``rows`` tokens."""
    sizes = {name: held_bytes([name], inputs, rows) for name in inputs}
    target, acc = sum(sizes.values()) / count, 0.0
    groups: list[list[str]] = []
    current: list[str] = []
    for name, size in sizes.items():
        current.append(name)
        acc += size
        if acc >= target * (len(groups) + 1) and len(groups) < count - 1:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


@dataclass(frozen=True)
class PassMemory:
    """What a pass over the estimate batches holds besides the sums, read after the first batch's forward."""

    in_use: int  # the memory in use then (in_use_bytes): weights, libraries, one batch's activations
    rows_before_last: int | None  # tokens of every batch but the last
    rows: int | None  # tokens of all batches

    def peak_bytes(self, group: list[str], inputs: dict[str, LayerInput]) -> int:
        """What the sums of ``group`` add to the pass's peak, at the start of the last backward: those
        of every batch but the last. The last batch's inputs are its activations, and its ``dL/dy``
        arrive as its backward frees them (on a CPU once :func:`compact_factors` has kept the heap's
        layout: SmolLM2-135M's last backward then grew by what a LoRA step's does)."""
        return held_bytes(group, inputs, self.rows_before_last)


def layer_group_count(inputs: dict[str, LayerInput], memory: PassMemory) -> int:
    """The fewest contiguous layer groups (:func:`layer_groups`) whose sums each add at most
    :data:`ACCUMULATOR_SHARE` of ``memory.in_use`` to a pass's peak (:meth:`PassMemory.peak_bytes`);
    one layer a pass without a reading of the memory in use (no ``/proc``)."""
    budget = ACCUMULATOR_SHARE * memory.in_use
    if budget > 0:
        for count in range(1, len(inputs) + 1):
            groups = layer_groups(inputs, memory.rows, count)
            if max(memory.peak_bytes(group, inputs) for group in groups) <= budget:
                return count
    return len(inputs)
