"""How far each 4-bit method's initial model is from the full-precision one, on SmolLM2-135M (CPU).

    .venv/bin/python plugins/loftq/benchmarks/init_error.py [--rank 16] [--alphas 16,32] [--iterations 2,5]
                                                           [--out init_error.json]

For QLoRA (B = 0: the NF4 model itself), LoftQ at each alpha, and LoftQ with more alternations (the
paper's T, ``loftq_iter``) at the first alpha: the relative error of the logits
against the full-precision model's on held-out KJV blocks (||logits - reference|| / ||reference||),
the eval loss there (the full-precision model's beside it), and the attach time. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch


def main() -> None:
    """Measure every variant and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alphas", default="16,32")
    parser.add_argument("--iterations", default="2,5")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--out", default="init_error.json")
    opts = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_lowrank_plugins as hlp
    from hf_lowrank_plugins.app.data import load_blocks
    from hf_lowrank_plugins.app.embedded import default_model_dir

    source = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(source)
    _, held_out = load_blocks(None, tokenizer, opts.seq_len, max_blocks=4 * opts.blocks, eval_blocks=opts.blocks)
    batch = {
        k: torch.stack([torch.as_tensor(held_out[i][k]) for i in range(opts.blocks)]) for k in ("input_ids", "labels")
    }
    full = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        out = full(**batch)
    reference, reference_loss = out.logits, float(out.loss)

    rows = [
        {
            "method": "full precision",
            "alpha": None,
            "loftq_iter": None,
            "logit_error": 0.0,
            "eval_loss": reference_loss,
            "attach_s": 0.0,
        }
    ]
    alphas = [int(a) for a in opts.alphas.split(",")]
    variants = [("qlora", alphas[0], None)] + [("loftq", a, 1) for a in alphas]
    variants += [("loftq", alphas[0], int(t)) for t in opts.iterations.split(",") if t]
    for method, alpha, iterations in variants:
        started = time.perf_counter()
        settings = {"loftq_iter": iterations} if iterations else {}
        adapted = hlp.attach(copy.deepcopy(full), method, r=opts.rank, lora_alpha=alpha, **settings)
        attach_s = time.perf_counter() - started
        adapted.model.eval()
        with torch.no_grad():
            result = adapted.model(**batch)
        error = float((result.logits - reference).norm() / reference.norm())
        rows.append(
            {
                "method": method,
                "alpha": alpha,
                "loftq_iter": iterations,
                "logit_error": error,
                "eval_loss": float(result.loss),
                "attach_s": attach_s,
            }
        )
        del adapted

    print(f"SmolLM2-135M-Instruct, {opts.blocks} KJV blocks of {opts.seq_len} tokens, rank {opts.rank}\n")
    print("| method | alpha | alternations | logit error vs full precision | eval loss | attach s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        alpha = "" if row["alpha"] is None else row["alpha"]
        iterations = "" if row["loftq_iter"] is None else row["loftq_iter"]
        print(
            f"| {row['method']} | {alpha} | {iterations} | {row['logit_error']:.4f} | {row['eval_loss']:.4f} "
            f"| {row['attach_s']:.1f} |"
        )
    document = {
        "rank": opts.rank,
        "blocks": opts.blocks,
        "seq_len": opts.seq_len,
        "rows": rows,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": torch.get_num_threads()},
    }
    Path(opts.out).write_text(json.dumps(document, indent=2))
    print(f"\nwrote {opts.out}")


if __name__ == "__main__":
    main()
