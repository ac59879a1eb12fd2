"""Learning-rate sweeps on the real model: eval-loss curves per (method, lr), each run in a fresh process.

    .venv/bin/python benchmarks/lr_sweep.py --sweep lora=1e-3,2e-3,4e-3 --sweep full=1e-4,2e-4 \
        [--steps 80] [--output benchmarks/results/lr_sweep.json] [--fresh]

Every run is ``hf_lowrank_plugins.app.train.run_training`` (what ``hf-lowrank train`` runs) with the
settings of the README's method study: SmolLM2-135M-Instruct and the packaged text, rank 16 and
alpha 16 on all linear layers, batch 4 x 64 tokens, linear decay, the same seed and data order,
evaluation every 5 steps on 16 held-out blocks. ``--set METHOD.KEY=VALUE`` passes a config field
(e.g. ``galore.rank=32``). Runs already in the output file with the same steps and settings are
reused, so widening a sweep trains only the new rates. Prints each method's best rate (lowest
final eval loss) and writes JSON with every curve.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

#: The method study's settings (README), shared by every run of a sweep.
STUDY = dict(rank=16, alpha=16, batch_size=4, seq_len=64, eval_every=5, eval_blocks=16, seed=0)


def train(method: str, lr: float, steps: int, settings: dict[str, Any], out: Path) -> dict[str, Any]:
    """One training run in a fresh process, exactly as ``hf-lowrank compare`` runs a method; its metrics."""
    from hf_lowrank_plugins.app.compare import CompareSpec, plan, run_method
    from hf_lowrank_plugins.app.train import TrainSpec

    # compare's planner validates the settings and passes rank/alpha only to methods that have them
    (run,) = plan(
        CompareSpec(
            methods=[method],
            run=TrainSpec(method=method, max_steps=steps, **STUDY),
            output_dir=str(out),
            lr=lr,
            settings={method: settings},
        )
    )
    metrics = run_method(run, f"{method} lr={lr:g}", log=lambda line: print(line, file=sys.stderr, flush=True))
    if "error" in metrics:
        raise SystemExit(f"{method} lr={lr:g} failed: {metrics['error']}")
    return metrics


def curve(metrics: dict[str, Any]) -> list[tuple[int, float]]:
    """(step, eval loss) from step 0 on, one entry per step."""
    points = {0: metrics["eval_loss_before"]}
    points.update({e["step"]: e["eval_loss"] for e in metrics["eval_history"]})
    return sorted(points.items())


def run_sweep(
    sweep: dict[str, list[float]],
    steps: int,
    output: Path,
    settings: dict[str, dict[str, Any]] | None = None,
    fresh: bool = False,
) -> list[dict[str, Any]]:
    """Train every (method, lr) not already in ``output`` with the same steps and settings; return all runs.

    Each run: method, lr, settings, curve, init/step seconds, peak memory, and ``best_for_method``.
    """
    settings = settings or {}
    previous: dict[tuple[str, float, str], dict[str, Any]] = {}
    if output.exists() and not fresh:
        earlier = json.loads(output.read_text())
        if earlier.get("steps") == steps:
            previous = {
                (r["method"], r["lr"], json.dumps(r.get("settings", {}), sort_keys=True)): r for r in earlier["runs"]
            }
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, rates in sweep.items():
            fields = settings.get(method, {})
            for lr in rates:
                key = (method, lr, json.dumps(fields, sort_keys=True))
                if key in previous:
                    runs.append(previous[key])
                    print(f"{method} lr={lr:g}: reused from {output.name}", file=sys.stderr, flush=True)
                    continue
                m = train(method, lr, steps, fields, Path(tmp) / f"{method}-{lr:g}")
                runs.append(
                    {
                        "method": method,
                        "lr": lr,
                        "settings": fields,
                        "curve": curve(m),
                        "init_seconds": m["init_seconds"],
                        "median_step_seconds": m.get("median_step_seconds"),
                        "peak_memory_mb": m["peak_memory_mb"],
                    }
                )
                print(
                    f"{method} lr={lr:g}: final eval loss {runs[-1]['curve'][-1][1]:.4f}", file=sys.stderr, flush=True
                )
    for method in sweep:
        best = min((r for r in runs if r["method"] == method), key=lambda r: r["curve"][-1][1])
        for r in runs:
            if r["method"] == method:
                r["best_for_method"] = r is best
    output.write_text(json.dumps({"steps": steps, "study_settings": STUDY, "runs": runs}, indent=2))
    return runs


def print_curves(runs: list[dict[str, Any]], every: int = 10) -> None:
    """A markdown table: eval loss every ``every`` steps per run, the best rate of each method in bold."""
    steps = [s for s, _ in runs[0]["curve"] if s % every == 0]
    print("| method | lr | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|---|" + "---|" * len(steps))
    for r in runs:
        by_step = dict((s, v) for s, v in r["curve"])
        bold = "**" if r.get("best_for_method") else ""
        cells = " | ".join(f"{by_step[s]:.4f}" for s in steps)
        print(f"| {bold}{r['method']}{bold} | {bold}{r['lr']:g}{bold} | {cells} |")


def main() -> None:
    """Parse ``--sweep METHOD=LR,...`` (repeatable), run, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="append", required=True, metavar="METHOD=LR,LR,...")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--output", default="benchmarks/results/lr_sweep.json")
    parser.add_argument("--fresh", action="store_true", help="retrain runs already in --output")
    ns = parser.parse_args()
    sweep = {}
    for item in ns.sweep:
        method, _, rates = item.partition("=")
        sweep[method.strip()] = [float(x) for x in rates.split(",") if x.strip()]
    from hf_lowrank_plugins.app.parser import parse_scoped_set  # compare's --set syntax and value parsing

    runs = run_sweep(sweep, ns.steps, Path(ns.output), parse_scoped_set(ns.set), ns.fresh)
    print_curves(runs)
    for method in sweep:
        best = next(r for r in runs if r["method"] == method and r["best_for_method"])
        print(f"{method}: best lr {best['lr']:g}, final eval loss {best['curve'][-1][1]:.4f}")


if __name__ == "__main__":
    main()
