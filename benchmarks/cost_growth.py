"""How step time and memory grow with model width and with rank, one method at a time.

    .venv/bin/python benchmarks/cost_growth.py [--methods lora,full] [--widths 256,512,1024] [--layers 4]
        [--ranks 4,16,64] [--rank-width 512] [--output benchmarks/results/cost_growth.json]

Models are SmolLM2-shaped Llamas built from config (random weights; head dim 64, MLP 8/3 x width,
SmolLM2's 49,152-token vocabulary with tied embeddings), so no checkpoint is needed for any width.
Width sweep: every method at every width with ``--rank``. Rank sweep: every method that has a
rank at ``--rank-width``. Each point is a fresh process through the shared worker
(``harness.py``); each figure is also given as a ratio to the method's first point.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from typing import Any

from harness import BenchOptions, add_options, figure, machine, options_from, run_isolated, write_json

FIGURES = {"median_step_s": "step s", "peak_train_rss_mib": "train peak MiB", "opt_state_mib": "opt state MiB"}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def sweep(methods: list[str], points: list[tuple[str, int]], make: Any, timeout: float) -> list[dict[str, Any]]:
    """Run ``make(method, value) -> BenchOptions`` for every method and point; ratios to each method's first point."""
    rows = []
    for method in methods:
        first: dict[str, Any] | None = None
        for axis, value in points:
            options = make(method, value)
            if options is None:
                continue
            result = run_isolated(f"ours:{method}", options, timeout)
            result.update(method=method, axis=axis, value=value)
            if "error" not in result:
                first = first or result
                result["vs_first"] = {k: result[k] / first[k] if first[k] else None for k in FIGURES}
            rows.append(result)
            state = "FAILED: " + result["error"] if "error" in result else f"{result['median_step_s']:.3f}s/step"
            print(f"{method} {axis}={value}: {state}", file=sys.stderr, flush=True)
    return rows


def print_rows(rows: list[dict[str, Any]], axis: str) -> None:
    """A markdown table of one sweep."""
    print(
        f"| method | {axis} | model params | trainable | "
        + " | ".join(f"{v} | x first" for v in FIGURES.values())
        + " |"
    )
    print("|---|---|---|---|" + "---|---|" * len(FIGURES))
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | {r['value']} | failed: {r['error'][:100]} |" + " |" * (2 * len(FIGURES) + 1))
            continue
        cells = " | ".join(
            f"{figure(r[k])} | {r['vs_first'][k]:.2f}" if r["vs_first"][k] is not None else f"{figure(r[k])} | -"
            for k in FIGURES
        )
        print(f"| {r['method']} | {r['value']} | {r['model_params']:,} | {r['trainable_params']:,} | {cells} |")


def main() -> None:
    """Run the width sweep and the rank sweep, print both tables, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="lora,full", help="our method names (ours:<name> variants of harness.py)")
    parser.add_argument("--widths", default="256,512,1024")
    parser.add_argument("--ranks", default="4,16,64")
    parser.add_argument("--rank-width", type=int, default=512)
    parser.add_argument("--output", default="benchmarks/results/cost_growth.json")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per point")
    add_options(parser, BenchOptions(steps=3, warmup=1, galore_rank=32))
    ns = parser.parse_args()
    base = options_from(ns)
    methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    started_on = machine()

    def at_width(method: str, width: int) -> BenchOptions:
        return dataclasses.replace(base, width=width)

    def at_rank(method: str, rank: int) -> BenchOptions | None:
        if method == "full":  # no rank to vary
            return None
        return dataclasses.replace(base, width=ns.rank_width, rank=rank, galore_rank=rank)

    widths = sweep(methods, [("width", w) for w in _ints(ns.widths)], at_width, ns.timeout)
    ranks = sweep(methods, [("rank", r) for r in _ints(ns.ranks)], at_rank, ns.timeout)
    print(
        f"\n{base.layers} layers, batch {base.batch_size} x {base.seq_len} tokens, median of {base.steps} steps after "
        f"{base.warmup} warm-up; width sweep at rank {base.rank} (GaLore {base.galore_rank})\n"
    )
    print_rows(widths, "width")
    print(f"\nrank sweep at width {ns.rank_width}\n")
    print_rows(ranks, "rank")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    document = {
        "command": command,
        "settings": vars(ns),
        "machine": {**started_on, "load_average_end": machine()["load_average"]},
        "width_sweep": widths,
        "rank_sweep": ranks,
    }
    print(f"\nwrote {write_json(ns.output, document)}")


if __name__ == "__main__":
    main()
