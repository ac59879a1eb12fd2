"""Quality study on SmolLM2-135M + the packaged KJV text: dense LoRA vs SALOR and its ablations.

Every variant is one ``hf_lowrank_plugins.app.train.run_training`` call (the code path of
``hf-lowrank train``) in a fresh process, with the same data, seed, rank, alpha, steps, batch and
learning rate. Figures that need no training come from the runs' ``eval_loss_before``:

* dense model                 = lora run, before training (B = 0)
* magnitude pruning alone     = salor repair_init=lora run, before training (B = 0 on the pruned base)
* pruned + rank-r SVD repair  = salor run, before training

    python plugins/salor/benchmarks/quality.py [--steps 60] [--out /tmp/salor-quality]

prints a table and writes quality.json next to this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

VARIANTS: dict[str, tuple[str, dict]] = {
    "dense LoRA": ("lora", {}),
    "SALOR 50% unstructured (SVD init)": ("salor", {"svd": "fast"}),
    "prune 50% + plain LoRA (B=0)": ("salor", {"repair_init": "lora"}),
    "adapter sparsity 50% (dense base, static masks)": ("salor", {"sparsity_target": "adapter"}),
    "SALOR 50% 2:4 (SVD init)": ("salor", {"sparsity_pattern": "2:4", "svd": "fast"}),
    "SALOR 50% global (SVD init)": ("salor", {"sparsity_pattern": "global", "svd": "fast"}),
    "adapter sparsity 50% (dense base, cubic ramp)": (
        "salor",
        {"sparsity_target": "adapter", "adapter_schedule": "cubic"},
    ),
}

CHILD = """
import json, sys
from hf_lowrank_plugins.app.train import TrainSpec, run_training
run_training(TrainSpec(**json.loads(sys.argv[1])))
"""
KEYS = (
    "eval_loss_before",
    "eval_loss_after",
    "eval_history",
    "train_loss",
    "train_seconds",
    "init_seconds",
    "peak_memory_mb",
    "trainable_params",
    "steps",
    "config",
)


def main() -> None:
    """Run the variants (all, or those named/numbered with --only), --jobs at a time, and write quality.json.

    A variant whose ``OUT/<index>/metrics.json`` exists is not run again (the study can be resumed).
    """
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=30)
    p.add_argument("--jobs", type=int, default=1, help="variants run concurrently (one torch thread each when > 1)")
    p.add_argument("--out", default="/tmp/salor-quality")
    p.add_argument("--only", nargs="*")
    ns = p.parse_args()
    chosen = [
        (i, label, method, dict(fields))
        for i, (label, (method, fields)) in enumerate(VARIANTS.items())
        if not ns.only or label in ns.only or str(i) in ns.only
    ]
    pending: list[tuple[str, subprocess.Popen]] = []
    env = dict(os.environ, OMP_NUM_THREADS="1") if ns.jobs > 1 else dict(os.environ)
    for i, label, method, fields in chosen:
        if (Path(ns.out) / str(i) / "metrics.json").is_file():
            continue
        if fields.get("adapter_schedule") == "cubic":
            fields["adapter_schedule_steps"] = ns.steps // 2
        spec = dict(
            method=method,
            output_dir=f"{ns.out}/{i}",
            max_steps=ns.steps,
            rank=ns.rank,
            alpha=ns.alpha,
            lr=ns.lr,
            batch_size=ns.batch_size,
            seq_len=ns.seq_len,
            eval_every=ns.eval_every,
            seed=0,
            settings=fields,
        )
        while len(pending) >= ns.jobs:
            pending = _reap(pending)
        log = open(Path(ns.out).mkdir(parents=True, exist_ok=True) or Path(ns.out) / f"{i}.log", "w")
        pending.append(
            (label, subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], stdout=log, stderr=log, env=env))
        )
    while pending:
        pending = _reap(pending)
    results = {
        "_settings": {
            "steps": ns.steps,
            "batch_size": ns.batch_size,
            "seq_len": ns.seq_len,
            "rank": ns.rank,
            "alpha": ns.alpha,
            "lr": ns.lr,
            "eval_blocks": 16,
            "target_modules": "all-linear",
            "seed": 0,
        }
    }
    for i, (label, (method, fields)) in enumerate(VARIANTS.items()):
        path = Path(ns.out) / str(i) / "metrics.json"
        if path.is_file():
            m = json.loads(path.read_text())
            results[label] = {"method": method, "fields": fields, **{k: m[k] for k in KEYS if k in m}}
    (HERE / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def _reap(pending: list[tuple[str, subprocess.Popen]]) -> list[tuple[str, subprocess.Popen]]:
    time.sleep(5)
    alive = []
    for label, proc in pending:
        if proc.poll() is None:
            alive.append((label, proc))
        elif proc.returncode != 0:
            print(f"variant {label!r} failed (exit {proc.returncode}); see its log", file=sys.stderr)
        else:
            print(f"done: {label}", flush=True)
    return alive


def print_table(results: dict) -> None:
    """The README table from quality.json."""
    rows = {k: v for k, v in results.items() if not k.startswith("_")}
    print("| variant | eval loss before training | eval loss after | trainable params |")
    print("|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['eval_loss_before']:.4f} | {r['eval_loss_after']:.4f} | {r['trainable_params']:,} |")


if __name__ == "__main__":
    main()
