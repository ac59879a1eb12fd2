"""LoRA vs LoRA-GA eval-loss curves on SmolLM2-135M with the packaged text, equal rank and budget.

Each run is ``benchmarks/lr_sweep.py``'s: ``run_training`` in its own process (the same as
``hf-lowrank train``) with the method study's settings: rank 16, alpha 16, all-linear, batch 4 x 64
tokens, linear decay, the same data order and eval blocks, evaluation every 5 steps. Each method
gets a learning-rate sweep around its own advised rate, so neither is judged at a rate that suits
only the other:

* LoRA at 5e-4 to 8e-3 (factors of 2): B = 0 at start and the update is scaled by alpha/r, so
  adapters need about 10x the full fine-tuning rate; a 135M model over ~80 steps tolerates and
  needs more than the 7B-scale habit of 2e-4.
* LoRA-GA at 5e-5 to 8e-4 (factors of 2): its first step imitates a full fine-tuning step, so its
  paper advises the full fine-tuning rate, about 10x below LoRA's.

Prints the curves, each method's best rate (lowest final eval loss), and the step at which every
run first reaches the best LoRA run's final eval loss; writes ``bench_convergence.json``. Runs
already in that file with the same number of steps are reused, so widening the sweep only trains
the new rates (``--fresh`` retrains everything).
Usage: ``python bench_convergence.py [--steps N] [--fresh]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2] / "benchmarks"))

from lr_sweep import run_sweep  # noqa: E402  (needs the path above; the study's settings live there)

SWEEP = {"lora": [5e-4, 1e-3, 2e-3, 4e-3, 8e-3], "lora_ga": [5e-5, 1e-4, 2e-4, 4e-4, 8e-4]}
OUTPUT = HERE / "bench_convergence.json"


def main() -> None:
    """Run the sweep, print the curves and steps-to-LoRA's-final-loss, write JSON."""
    steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 80
    runs = run_sweep(SWEEP, steps, OUTPUT, fresh="--fresh" in sys.argv)
    best = {method: next(r for r in runs if r["method"] == method and r["best_for_method"]) for method in SWEEP}
    target = best["lora"]["curve"][-1][1]
    for r in runs:
        r["steps_to_best_lora_final"] = next((s for s, v in r["curve"] if v <= target), None)
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
    print(
        f"best LoRA final eval loss {target:.4f} at step {steps}; best LoRA-GA reaches it at step {reached}"
        + (f" ({speedup:.2f}x fewer steps)" if speedup else "")
    )
    document = json.loads(OUTPUT.read_text())
    document.update(best_lora_final=target, best_lora_ga_steps_to_it=reached, speedup=speedup, runs=runs)
    OUTPUT.write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
