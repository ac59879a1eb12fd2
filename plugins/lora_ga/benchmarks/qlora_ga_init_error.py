"""QLoRA-GA's initial model beside QLoRA's and QPiSSA's, on SmolLM2-135M (CPU).

    .venv/bin/python plugins/lora_ga/benchmarks/qlora_ga_init_error.py [--rank 16] [--out qlora_ga_init_error.json]

Every variant starts from the same full-precision model and ends on a 4-bit base; the table gives,
right after initialisation (LoRA-GA's train-start estimate included), the relative error of the
logits on held-out KJV blocks (``||logits - reference|| / ||reference||``) against the
full-precision model and against the plain 4-bit model NF4(W) (QLoRA at B = 0), the eval loss, and
the initialisation time. LoRA-GA's variants estimate on the same ``--ga-batches`` training batches;
``lora_ga`` in full precision is the yardstick (its residual is exact). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch


def _logits_and_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    return out.logits.float(), float(out.loss)


def main() -> None:
    """Measure every variant and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--ga-batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default="qlora_ga_init_error.json")
    opts = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_lowrank_plugins as hlp
    from hf_lowrank_plugins.app.data import load_blocks
    from hf_lowrank_plugins.app.embedded import default_model_dir

    torch.manual_seed(0)
    source = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(source)
    needed = opts.ga_batches * opts.batch_size
    train, held_out = load_blocks(
        None, tokenizer, opts.seq_len, max_blocks=needed + 4 * opts.blocks, eval_blocks=opts.blocks
    )
    batch = {
        k: torch.stack([torch.as_tensor(held_out[i][k]) for i in range(opts.blocks)]) for k in ("input_ids", "labels")
    }
    loader = torch.utils.data.DataLoader(train, batch_size=opts.batch_size, shuffle=False)
    ga_batches = [b for _, b in zip(range(opts.ga_batches), loader, strict=False)]
    full = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    reference, reference_loss = _logits_and_loss(full, batch)

    variants: list[tuple[str, str, dict[str, Any], bool]] = [
        ("QLoRA (B = 0: NF4(W))", "qlora", {}, False),
        ("QPiSSA (NF4(W - sBA) + sBA)", "pissa", {"load_in_4bit": True}, False),
        ("LoRA-GA, full precision", "lora_ga", {"ga_batches": opts.ga_batches}, True),
        (
            "QLoRA-GA (NF4(deq(NF4(W)) - sBA) + sBA)",
            "lora_ga",
            {"ga_batches": opts.ga_batches, "load_in_4bit": True},
            True,
        ),
        (
            "QLoRA-GA, scale=gd",
            "lora_ga",
            {"ga_batches": opts.ga_batches, "load_in_4bit": True, "scale": "gd"},
            True,
        ),
    ]
    rows = [{"variant": "full precision", "vs_full": 0.0, "vs_nf4": None, "eval_loss": reference_loss, "init_s": 0.0}]
    nf4: torch.Tensor | None = None
    for label, method, settings, data_init in variants:
        started = time.perf_counter()
        adapted = hlp.attach(copy.deepcopy(full), method, r=opts.rank, **settings)
        if data_init:
            adapted.begin_training(ga_batches)
        init_s = time.perf_counter() - started
        logits, loss = _logits_and_loss(adapted.model, batch)
        if nf4 is None:
            nf4 = logits  # QLoRA at B = 0 is the plain 4-bit model
        rows.append(
            {
                "variant": label,
                "vs_full": float((logits - reference).norm() / reference.norm()),
                "vs_nf4": float((logits - nf4).norm() / nf4.norm()),
                "eval_loss": loss,
                "init_s": init_s,
            }
        )
        del adapted

    print(f"SmolLM2-135M-Instruct, {opts.blocks} KJV blocks of {opts.seq_len} tokens, rank {opts.rank}\n")
    print("| variant | logit error vs full precision | vs NF4(W) | eval loss | init s |")
    print("|---|---|---|---|---|")
    for row in rows:
        vs_nf4 = "" if row["vs_nf4"] is None else f"{row['vs_nf4']:.4f}"
        print(f"| {row['variant']} | {row['vs_full']:.4f} | {vs_nf4} | {row['eval_loss']:.4f} | {row['init_s']:.1f} |")
    document = {
        "rank": opts.rank,
        "blocks": opts.blocks,
        "seq_len": opts.seq_len,
        "ga_batches": opts.ga_batches,
        "batch_size": opts.batch_size,
        "rows": rows,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": torch.get_num_threads()},
    }
    Path(opts.out).write_text(json.dumps(document, indent=2))
    print(f"\nwrote {opts.out}")


if __name__ == "__main__":
    main()
