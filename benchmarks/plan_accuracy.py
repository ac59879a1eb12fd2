"""``hf-lowrank plan`` against measured peaks: every method, SmolLM2-135M and two models built from configs.

For each model and method, the plan (``hf_lowrank_plugins.plan.plan_memory``, device ``cpu``) is
computed from the config alone, then the method is trained by the shared benchmark worker
(``harness.run_isolated``: a fresh process, the Trainer, ``--warmup + --steps`` steps, evaluation)
and its peak RSS read. The table gives both and the error of the plan (plan / measured - 1)::

    .venv/bin/python benchmarks/plan_accuracy.py --out benchmarks/results/plan_accuracy.json
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from harness import (
    BenchOptions,
    figure,
    machine,
    run_isolated,
    smollm2_shaped_config,
    write_json,
)

METHODS = ("lora", "dora", "qlora", "pissa", "lora_ga", "galore", "salor", "full")
#: model name -> (width, layers) of a SmolLM2-shaped config; None is the embedded SmolLM2-135M itself.
MODELS: dict[str, tuple[int, int] | None] = {
    "smollm2-135m": None,
    "w512-l8": (512, 8),
    "w1536-l12": (1536, 12),
    # measured on request (not in the default set): 0.80B and 1.07B parameters (Llama-3.2-1B has 1.24B,
    # 0.97B of them outside its 128k-token embedding)
    "w2048-l16": (2048, 16),
    "w2048-l22": (2048, 22),
}
DEFAULT_MODELS = ("smollm2-135m", "w512-l8", "w1536-l12")
VOCAB = 49152  # SmolLM2's tokenizer: the config-built models use it too


def _method_fields(method: str, o: BenchOptions) -> dict[str, Any]:
    """The fields the worker gives ``method`` (see ``harness._ours``)."""
    from harness import _ours

    return _ours(method, o)[1]


def _plan(model: str, method: str, o: BenchOptions) -> dict[str, Any]:
    import torch

    from hf_lowrank_plugins.app.embedded import default_model_dir
    from hf_lowrank_plugins.plan import plan_memory
    from hf_lowrank_plugins.types import PlanSettings

    shape = MODELS[model]
    source: Any = default_model_dir() if shape is None else smollm2_shaped_config(*shape, VOCAB)
    settings = PlanSettings(batch_size=o.batch_size, seq_len=o.seq_len, dtype=torch.float32, device="cpu")
    return plan_memory(source, method, settings, **_method_fields(method, o)).as_dict()


def main() -> None:
    """Plan and measure every (model, method); print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/plan_accuracy.json")
    parser.add_argument(
        "--replan", help="an earlier output: keep its measurements, recompute the plans (after changing the planner)"
    )
    args = parser.parse_args()
    earlier = {}
    if args.replan:
        import json

        earlier = {(r["model"], r["method"]): r["measured"] for r in json.load(open(args.replan))["results"]}
        args.models = list(dict.fromkeys(m for m, _ in earlier))
        args.methods = list(dict.fromkeys(m for _, m in earlier))
    rows = []
    for model in args.models:
        shape = MODELS[model]
        options = BenchOptions(
            steps=args.steps,
            warmup=args.warmup,
            width=shape[0] if shape else None,
            layers=shape[1] if shape else 4,
        )
        for method in args.methods:
            if args.replan and (model, method) not in earlier:
                continue
            plan = _plan(model, method, options)
            measured = earlier.get((model, method)) or run_isolated(f"ours:{method}", options)
            row = {"model": model, "method": method, "plan": plan, "measured": measured}
            if "error" not in measured:
                row["error"] = plan["total_mib"] / measured["peak_rss_mib"] - 1
            rows.append(row)
            print(
                f"{model:<13} {method:<8} plan {figure(plan['total_mib']):>7} MiB  "
                f"measured {figure(measured.get('peak_rss_mib', float('nan'))):>7} MiB  "
                f"error {row.get('error', float('nan')):+.1%}",
                flush=True,
            )
            write_json(args.out, {"command": " ".join(sys.argv), "machine": machine(), "results": rows})  # as it goes
    errors = [abs(r["error"]) for r in rows if "error" in r]
    if errors:
        print(f"largest |error| {max(errors):.1%}; within 20%: {sum(e <= 0.2 for e in errors)}/{len(errors)}")
    write_json(args.out, {"command": " ".join(sys.argv), "machine": machine(), "results": rows})


if __name__ == "__main__":
    main()
