"""Every method under ``TrainingArguments(torch_compile=True)``: does it train, to the same losses, and how fast.

Each (method, eager | compiled) pair runs in a fresh process: the same seed, data and steps. The
first loss (one forward through the same weights) must agree to float rounding; later losses drift
apart as Adam's first steps turn rounding-level differences in near-zero gradients into full-size
updates (visible on SmolLM2 at lr 5e-3, not on the tiny model). Step time is the
median of the steps after the warm-up (the first compiled steps pay the compilation, reported
separately as ``first_steps_s``)::

    .venv/bin/python benchmarks/torch_compile.py                          # tiny Llama, every method
    .venv/bin/python benchmarks/torch_compile.py --model smollm2 --methods lora --steps 4

Writes ``benchmarks/results/torch_compile.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from harness import machine, write_json

WORKER = r"""
import json, sys, tempfile, time
import torch
from transformers import Trainer, TrainerCallback
import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.testing.helpers import TokenDataset, make_tiny_model, training_args

method, compiled, model_name, warmup, steps = sys.argv[1], sys.argv[2] == "1", sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
if model_name == "tiny":
    model, data, batch = make_tiny_model(), TokenDataset(), 8
else:
    from transformers import AutoModelForCausalLM
    from hf_lowrank_plugins.app.embedded import default_model_dir
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    data, batch = TokenDataset(n=64, seq_len=64), 2

class Clock(TrainerCallback):
    def __init__(self): self.times, self.start = [], 0.0
    def on_step_begin(self, *a, **k): self.start = time.perf_counter()
    def on_step_end(self, *a, **k): self.times.append(time.perf_counter() - self.start)

fields = {} if method == "full" else {"rank": 16 if model_name != "tiny" else 4}
adapted = hlp.attach(model, method, load_in_4bit=method == "qlora", **fields)
clock = Clock()
with tempfile.TemporaryDirectory() as out:
    args = training_args(out, max_steps=warmup + steps, per_device_train_batch_size=batch, torch_compile=compiled)
    kwargs = adapted.trainer_kwargs()
    kwargs["callbacks"] = [*kwargs["callbacks"], clock]
    trainer = Trainer(model=adapted.model, args=args, train_dataset=data, **kwargs)
    try:
        trainer.train()
        error = None
    except Exception as exc:  # a method that fails under compile is reported, not hidden
        error = f"{type(exc).__name__}: {str(exc)[:300]}"
losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
print(json.dumps({"losses": losses, "step_times": clock.times, "error": error}))
"""


def _run(method: str, compiled: bool, model: str, warmup: int, steps: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, method, "1" if compiled else "0", model, str(warmup), str(steps)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"losses"')]
    if proc.returncode or not lines:
        return {"error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "no output"}
    return json.loads(lines[-1])


def main() -> None:
    """Run every method eager and compiled, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument(
        "--methods", nargs="+", default=["lora", "qlora", "dora", "pissa", "lora_ga", "galore", "salor", "full"]
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)  # tiny steps take milliseconds: 6 were too noisy
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "torch_compile.json"))
    args = parser.parse_args()
    rows = []
    print(
        f"{'method':<8} {'compiled':<9} {'eager step s':>12} {'compiled step s':>15} {'speed-up':>8} {'loss diff':>10}"
    )
    for method in args.methods:
        eager, compiled = (_run(method, c, args.model, args.warmup, args.steps) for c in (False, True))
        row = {"method": method, "model": args.model, "eager": eager, "compiled": compiled}
        if not eager.get("error") and not compiled.get("error"):
            row["eager_step_s"] = statistics.median(eager["step_times"][args.warmup :])
            row["compiled_step_s"] = statistics.median(compiled["step_times"][args.warmup :])
            row["first_steps_s"] = sum(compiled["step_times"][: args.warmup])
            row["speedup"] = row["eager_step_s"] / row["compiled_step_s"]
            row["first_loss_diff"] = abs(eager["losses"][0] - compiled["losses"][0])
            row["max_loss_diff"] = max(abs(a - b) for a, b in zip(eager["losses"], compiled["losses"], strict=True))
            print(
                f"{method:<8} {'works':<9} {row['eager_step_s']:>12.4f} {row['compiled_step_s']:>15.4f} "
                f"{row['speedup']:>7.2f}x {row['first_loss_diff']:>13.1e} {row['max_loss_diff']:>13.1e}"
            )
        else:
            print(f"{method:<8} failed: {compiled.get('error') or eager.get('error')}")
        rows.append(row)
    write_json(args.out, {"command": " ".join(sys.argv), "machine": machine(), "results": rows})


if __name__ == "__main__":
    main()
