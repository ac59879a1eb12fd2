"""LoRA vs LoRA-GA eval-loss curves on SmolLM2-135M with the packaged text, equal rank and budget.

Each run is ``hf_lowrank_plugins.train.run_training`` in its own process (the same as
``hf-lowrank train``): rank 16, alpha 16, all-linear, batch 4 x 64 tokens, linear decay, the same
data order and eval blocks, evaluation every 5 steps. Each method gets a small learning-rate sweep
around its own advised rate, so neither is judged at a rate that suits only the other:

* LoRA at 5e-4 to 8e-3 (factors of 2): B = 0 at start and the update is scaled by alpha/r, so adapters need
  about 10x the full fine-tuning rate; a 135M model over ~80 steps tolerates and needs more than
  the 7B-scale habit of 2e-4.
* LoRA-GA at 5e-5 to 8e-4 (factors of 2): its first step imitates a full fine-tuning step, so its paper
  advises the full fine-tuning rate, about 10x below LoRA's.

Prints the curves, each method's best rate (lowest final eval loss), and the step at which every
run first reaches the best LoRA run's final eval loss; writes ``bench_convergence.json``. Runs
already in that file with the same number of steps are reused, so widening the sweep only trains
the new rates (``--fresh`` retrains everything).
Usage: ``python bench_convergence.py [--steps N] [--fresh]``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SWEEP = {"lora": (5e-4, 1e-3, 2e-3, 4e-3, 8e-3), "lora_ga": (5e-5, 1e-4, 2e-4, 4e-4, 8e-4)}
OUTPUT = HERE / "bench_convergence.json"


def _run(method: str, lr: float, steps: int, out: Path) -> dict:
    """One training run in a fresh process; its metrics.json content."""
    spec = dict(method=method, output_dir=str(out), max_steps=steps, rank=16, alpha=16, lr=lr, batch_size=4,
                seq_len=64, eval_every=5, eval_blocks=16, seed=0, progress_bar=False)
    code = ("import json, sys\nfrom hf_lowrank_plugins.train import TrainSpec, run_training\n"
            "print('METRICS ' + json.dumps(run_training(TrainSpec(**json.loads(sys.argv[1])))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("METRICS ")]
    if proc.returncode or not line:
        print(proc.stderr[-3000:])
        raise SystemExit(f"{method} lr={lr} failed")
    return json.loads(line[-1][8:])


def _curve(metrics: dict) -> list[tuple[int, float]]:
    """(step, eval loss) from step 0, each step once (the final evaluation may be listed twice)."""
    curve = {0: metrics["eval_loss_before"]}
    curve.update({e["step"]: e["eval_loss"] for e in metrics["eval_history"]})
    return sorted(curve.items())


def main() -> None:
    """Run the sweep, print the curves and steps-to-LoRA's-final-loss, write JSON."""
    steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 80
    previous = {}
    if OUTPUT.exists() and "--fresh" not in sys.argv:
        earlier = json.loads(OUTPUT.read_text())
        if earlier.get("steps") == steps:
            previous = {(r["method"], r["lr"]): r for r in earlier["runs"]}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, rates in SWEEP.items():
            for lr in rates:
                if (method, lr) in previous:
                    runs.append(previous[(method, lr)])
                    print(method, lr, "reused from", OUTPUT.name, flush=True)
                    continue
                m = _run(method, lr, steps, Path(tmp) / f"{method}-{lr:g}")
                runs.append({"method": method, "lr": lr, "curve": _curve(m), "init_seconds": m["init_seconds"],
                             "median_step_seconds": m.get("median_step_seconds"), "peak_memory_mb": m["peak_memory_mb"]})
                print(method, lr, [(s, round(v, 4)) for s, v in runs[-1]["curve"]], flush=True)
    best = {method: min((r for r in runs if r["method"] == method), key=lambda r: r["curve"][-1][1]) for method in SWEEP}
    target = best["lora"]["curve"][-1][1]
    for r in runs:
        r["steps_to_best_lora_final"] = next((s for s, v in r["curve"] if v <= target), None)
        r["best_for_method"] = r is best[r["method"]]
    steps_axis = [s for s, _ in runs[0]["curve"]]
    header = "| method | lr | " + " | ".join(f"step {s}" for s in steps_axis) + " | steps to best LoRA's final |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for r in runs:
        cells = " | ".join(f"{v:.4f}" for _, v in r["curve"])
        mark = " (best)" if r["best_for_method"] else ""
        print(f"| {r['method']}{mark} | {r['lr']:g} | {cells} | {r['steps_to_best_lora_final']} |")
    reached = best["lora_ga"]["steps_to_best_lora_final"]
    speedup = steps / reached if reached else None
    print(f"best LoRA final eval loss {target:.4f} at step {steps}; best LoRA-GA reaches it at step {reached}"
          + (f" ({speedup:.2f}x fewer steps)" if speedup else ""))
    OUTPUT.write_text(json.dumps(
        {"steps": steps, "best_lora_final": target, "best_lora_ga_steps_to_it": reached, "speedup": speedup,
         "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
