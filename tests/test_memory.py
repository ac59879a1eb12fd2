"""``hf_lowrank_plugins.memory``: the old pages of replaced weights are handed back, and no data is lost."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.memory import release_replaced, status_bytes, trim_heap, weight_locations
from hf_lowrank_plugins.testing.helpers import logits, make_tiny_model

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise advice is Linux's")


@linux
def test_trim_heap_hands_back_the_free_blocks_glibc_keeps():
    """Freed blocks between live ones stay resident until trimmed: 1,000 blocks of 100 KiB (below
    glibc's mmap threshold, so they come from the heap), every other one freed (50 MiB that no
    trimming from the top of the heap can reach), then :func:`trim_heap` returns most of them."""
    blocks = [torch.ones(25_600) for _ in range(1_000)]
    kept = blocks[1::2]
    del blocks
    before = status_bytes("VmRSS")
    if not trim_heap():
        pytest.skip("no malloc_trim in this C library")
    assert before - status_bytes("VmRSS") >= 30 * 2**20
    assert all(float(block[0]) == 1.0 for block in kept)


@linux
def test_replaced_weights_are_advised_and_every_value_survives(tmp_path):
    """Advice on the old range of a replaced weight: the kept tensors (the old one still referenced
    here, the untouched neighbours of the memory-mapped checkpoint) read back unchanged."""
    make_tiny_model().save_pretrained(str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    before = {id(m): m.weight.detach().clone() for m in linears}
    old = linears[0].weight.data
    locations = weight_locations(linears)
    linears[0].weight.data = old * 2  # replaced; the old tensor stays referenced by `old`
    assert release_replaced(locations) > 0
    assert torch.equal(old, before[id(linears[0])])  # advice never loses data
    assert torch.equal(linears[0].weight, 2 * before[id(linears[0])])
    for module in linears[1:]:
        assert torch.equal(module.weight, before[id(module)])
    assert release_replaced(weight_locations(linears)) == 0  # nothing replaced since


def test_pissa_from_a_checkpoint_keeps_its_initialisation_exact(tmp_path):
    """PiSSA hands back the replaced pages after its SVD; the adapted model still equals the base."""
    make_tiny_model().save_pretrained(str(tmp_path))
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    batch = torch.randint(0, 64, (2, 16))
    expected = logits(base, batch)
    adapted = hlp.attach(base, "pissa", r=4)
    assert (logits(adapted.model, batch) - expected).abs().max() <= 1e-4


@linux
def test_memory_in_use_counts_mapped_weights_before_they_are_read(tmp_path):
    """A tensor over a private file mapping is not in the resident set until read; ``in_use_bytes`` counts
    it whole either way (LoRA-GA sizes its layer groups from it before its passes read the weights)."""
    from hf_lowrank_plugins.memory import _not_resident_bytes, in_use_bytes

    path = tmp_path / "weights.bin"
    n = 4 * 2**20  # 16 MiB of float32
    path.write_bytes(torch.arange(n, dtype=torch.float32).numpy().tobytes())
    mapped = torch.from_file(str(path), shared=False, size=n, dtype=torch.float32)
    assert _not_resident_bytes([mapped]) >= 15 * 2**20  # mapped, not read yet (the page cache does not count)
    assert torch.equal(mapped.clone(), torch.arange(n, dtype=torch.float32))  # reading pages it in
    assert _not_resident_bytes([mapped]) <= 2**20
    assert _not_resident_bytes([torch.ones(2**20)]) == 0  # anonymous memory is resident
    assert in_use_bytes(torch.device("cpu"), [mapped]) >= 16 * 2**20
