"""What one training forward keeps for backward: LoRA, our DoRA, PEFT's DoRA (SmolLM2-135M, batch 2 x 64).

Every tensor autograd saves during the forward (``torch.autograd.graph.saved_tensors_hooks``) and
still holds when it ends is counted once per storage, weights excluded: the activation memory a
step holds at its peak, measured exactly rather than through the process's resident size (which
the allocator blurs)::

    .venv/bin/python plugins/dora/benchmarks/saved_activations.py   # writes saved_activations.json beside it
"""

from __future__ import annotations

import copy
import json
import sys
import weakref
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.app.embedded import default_model_dir

RANK, BATCH, SEQ_LEN = 16, 2, 64


def saved_mib(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """MiB of the distinct non-parameter storages autograd still holds for backward at the end of one
    training forward of ``model`` (saved tensors of graphs dropped during the forward, such as a
    norm computed with a gradient and then detached, are freed by then and not counted)."""
    saved: list[weakref.ref[torch.Tensor]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(tensor))
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(input_ids=input_ids, labels=input_ids)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held = {
        tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes()
        for tensor in (ref() for ref in saved)
        if tensor is not None
    }
    del out
    return sum(size for address, size in held.items() if address not in weights) / 2**20


def main() -> None:
    """Measure each variant on the embedded SmolLM2, print the table, write the JSON."""
    base = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    input_ids = torch.randint(0, base.config.vocab_size, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    kw = {"r": RANK, "lora_alpha": RANK, "target_modules": "all-linear"}
    variants = {
        "ours:lora": lambda: hlp.attach(copy.deepcopy(base), "lora", **kw).model,
        "ours:dora": lambda: hlp.attach(copy.deepcopy(base), "dora", **kw).model,
        "peft:dora": lambda: get_peft_model(copy.deepcopy(base), LoraConfig(use_dora=True, **kw)),
    }
    rows = {name: saved_mib(build(), input_ids) for name, build in variants.items()}
    lora = rows["ours:lora"]
    print(f"SmolLM2-135M fp32, batch {BATCH} x {SEQ_LEN}, rank {RANK}, all linear layers\n")
    print("| variant | saved for backward MiB | x lora | beyond lora MiB |\n|---|---|---|---|")
    for name, mib in rows.items():
        print(f"| {name} | {mib:,.1f} | {mib / lora:.2f} | {mib - lora:,.1f} |")
    out = Path(__file__).with_suffix(".json")
    out.write_text(
        json.dumps(
            {"command": " ".join(sys.argv), "batch": BATCH, "seq_len": SEQ_LEN, "rank": RANK, "saved_mib": rows},
            indent=1,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
