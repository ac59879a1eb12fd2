"""LoRA vs LoRA-GA eval-loss curves on SmolLM2-135M with the packaged text, equal rank and budget.

Each run is ``hf_lowrank_plugins.train.run_training`` in its own process (the same as
``hf-lowrank train``), rank 16 all-linear, batch 4, the same data order and eval blocks. LoRA runs
at 1e-3 (B = 0 at start and the update is scaled by alpha/r, so adapters need about 10x the full
fine-tuning rate; 2e-4 is the 7B-scale habit, and a 135M model over ~60 steps tolerates and
needs more); LoRA-GA at the full-fine-tuning-like rate its paper advises (about 10x below
LoRA's, here 1e-4) and, for reference, at LoRA's rate. Prints the curves, the step at which each
run first reaches LoRA's final eval loss, writes bench_convergence.json.
Usage: ``python bench_convergence.py [--steps N]``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = [("lora", 1e-3, {}), ("lora_ga", 1e-4, {}), ("lora_ga", 1e-3, {})]


def _run(method: str, lr: float, settings: dict, steps: int, out: Path) -> dict:
    spec = dict(method=method, output_dir=str(out), max_steps=steps, rank=16, lr=lr, batch_size=4, seq_len=64,
                eval_every=10, eval_blocks=16, seed=0, progress_bar=False, settings=settings)
    code = ("import json, sys\nfrom hf_lowrank_plugins.train import TrainSpec, run_training\n"
            "print('METRICS ' + json.dumps(run_training(TrainSpec(**json.loads(sys.argv[1])))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("METRICS ")]
    if proc.returncode or not line:
        print(proc.stderr[-3000:])
        raise SystemExit(f"{method} lr={lr} failed")
    return json.loads(line[-1][8:])


def main() -> None:
    """Run LoRA and LoRA-GA, print the eval curves and steps-to-LoRA's-final-loss, write JSON."""
    steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 60
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (method, lr, settings) in enumerate(RUNS):
            m = _run(method, lr, settings, steps, Path(tmp) / f"run{i}")
            results.append({"method": method, "lr": lr, "settings": settings, "eval_loss_before": m["eval_loss_before"],
                            "eval_history": m["eval_history"], "init_seconds": m["init_seconds"],
                            "peak_memory_mb": m["peak_memory_mb"], "train_seconds": m["train_seconds"]})
            print(method, lr, [(e["step"], round(e["eval_loss"], 4)) for e in m["eval_history"]], flush=True)
    target = results[0]["eval_history"][-1]["eval_loss"]
    for r in results:
        r["steps_to_lora_final"] = next((e["step"] for e in r["eval_history"] if e["eval_loss"] <= target), None)
    header = "| method | lr | " + " | ".join(f"step {e['step']}" for e in results[0]["eval_history"]) + " | steps to LoRA's final |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for r in results:
        cells = " | ".join(f"{e['eval_loss']:.4f}" for e in r["eval_history"])
        print(f"| {r['method']} | {r['lr']:g} | {cells} | {r['steps_to_lora_final']} |")
    (HERE / "bench_convergence.json").write_text(json.dumps({"steps": steps, "lora_final": target, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
