"""The ZeRO flat-partition layouts GaLore steps on: whole weights out of rank slices and back.

The two-process runs in ``test_deepspeed.py`` show GaLore under ZeRO-1/2/3 equals a single
process; these cases pin the slicing itself on layouts those runs may not hit: a weight split
between ranks, padding between weights, a rank holding no part of a weight, ZeRO-3's padded last
piece. The layouts are built as ``distributed._zero12_partitions`` / ``_zero3_partitions`` build
them, from stand-ins for DeepSpeed's optimizers.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from hf_lowrank_plugins import distributed
from hf_lowrank_plugins.distributed import ZeroPartition

dist = pytest.importorskip("deepspeed.comm")

SHAPES = [torch.Size([3, 4]), torch.Size([2, 5])]
WEIGHTS = [torch.arange(12.0).view(3, 4), 100 + torch.arange(10.0).view(2, 5)]


def _zero12(monkeypatch, bounds: list[int]) -> tuple[list[ZeroPartition], list[torch.Tensor]]:
    """Each rank's layout and slice of a ZeRO-1/2 group: the 3x4 weight at 0, 4 elements of padding, 2x5 at 16."""
    flat = torch.full((bounds[-1],), float("nan"))  # padding must never reach a weight
    flat[0:12], flat[16:26] = WEIGHTS[0].flatten(), WEIGHTS[1].flatten()
    pieces = [flat[a:b] for a, b in itertools.pairwise(bounds)]
    layouts, slices = [], []
    for rank in range(len(pieces)):
        monkeypatch.setattr(dist, "get_rank", lambda group=None, rank=rank: rank)
        master = pieces[rank].clone()
        zero = SimpleNamespace(
            optimizer=SimpleNamespace(param_groups=[{"params": [master]}]),
            real_dp_process_group=[None],
            parallel_partitioned_bit16_groups=[pieces],
            round_robin_bit16_indices=[[0, 1]],
            round_robin_bit16_meta=[[torch.empty(s, device="meta") for s in SHAPES]],
            round_robin_bit16_offsets=[[0, 16]],
        )
        layouts.append(distributed.zero_partitions(zero)[id(master)])
        slices.append(master)
    return layouts, slices


def _zero3(monkeypatch, ranks: int) -> tuple[list[ZeroPartition], list[torch.Tensor]]:
    """Each rank's layout and slice of a ZeRO-3 sub-group: every weight split in ceil(n / ranks) pieces."""
    layouts, slices = [], []
    for rank in range(ranks):
        monkeypatch.setattr(dist, "get_rank", lambda group=None, rank=rank: rank)
        params, parts = [], []
        for weight in WEIGHTS:
            piece = -(-weight.numel() // ranks)
            padded = torch.cat([weight.flatten(), torch.full((piece * ranks - weight.numel(),), float("nan"))])
            parts.append(padded[rank * piece : (rank + 1) * piece])
            params.append(
                SimpleNamespace(
                    ds_tensor=SimpleNamespace(ds_numel=piece), ds_numel=weight.numel(), ds_shape=weight.shape
                )
            )
        master = torch.cat(parts)
        zero = SimpleNamespace(fp32_partitioned_groups_flat=[master], fp16_groups=[params], dp_process_group=None)
        layouts.append(distributed.zero_partitions(zero)[id(master)])
        slices.append(master)
    return layouts, slices


LAYOUTS = {
    "zero2-split": lambda mp: _zero12(mp, [0, 17, 34]),
    "zero2-3-ranks": lambda mp: _zero12(mp, [0, 6, 30, 36]),
    "zero2-rank-between-weights": lambda mp: _zero12(mp, [0, 12, 16, 34]),
    "zero3-2-ranks": lambda mp: _zero3(mp, 2),
    "zero3-3-ranks": lambda mp: _zero3(mp, 3),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_then_write_back_round_trips_every_weight(monkeypatch, layout):
    layouts, slices = LAYOUTS[layout](monkeypatch)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, group=None: tensor)  # each rank's own contribution
    for position, weight in enumerate(WEIGHTS):
        parts = [p.gather(p.weights[position], s, -s) for p, s in zip(layouts, slices, strict=True)]
        assert torch.equal(sum(values for values, _ in parts), weight)  # what the all-reduce adds up
        assert torch.equal(sum(gradient for _, gradient in parts), -weight)
        assert sum(p.weights[position].length for p in layouts) == weight.numel()  # every element held once
    for partition, flat in zip(layouts, slices, strict=True):
        before = flat.clone()
        for position, weight in enumerate(WEIGHTS):
            partition.write_back(partition.weights[position], weight + 0.5, flat)
        changed = flat.nan_to_num(-1) != before.nan_to_num(-1)
        assert torch.equal(flat[changed], before[changed] + 0.5)  # only its own elements, each moved once
        assert int(changed.sum()) == sum(w.length for w in partition.weights)
