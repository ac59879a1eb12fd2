"""Our methods against their anchors, side by side on one model and batch, a fresh process each.

    .venv/bin/python benchmarks/bench_anchors.py [--only ours:lora,peft:lora,...] [--steps 6] [--warmup 2]
        [--batch-size 2] [--seq-len 64] [--rank 16] [--galore-rank 128] [--output FILE]

Anchors: plain PEFT for LoRA, DoRA, PiSSA (exact and fast SVD), OLoRA, EVA
(``initialize_lora_eva_weights`` before training), CorDA (``preprocess_corda``), LoRA-GA (``preprocess_loraga``) and QLoRA; the
official ``adam-mini`` package's optimizer for Adam-mini; transformers' ``apollo_adamw`` (the
``apollo-torch`` package) for APOLLO and APOLLO-Mini; transformers' ``galore_adamw`` / ``galore_adamw_layerwise`` / ``galore_adafactor`` for GaLore; the plain
Trainer for our built-in ``full``. Variants whose plugin is not installed are skipped with a note.
What is measured is described in ``harness.py``. Prints a table of ratios ours / anchor (or, with
``--ratios-vs VARIANT``, every variant against that one) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from harness import (
    VARIANTS,
    add_options,
    figure,
    installed_methods,
    machine,
    options_from,
    run_isolated,
    write_json,
)

#: Figures compared as ratios: result key -> column label.
RATIO_KEYS = {
    "median_step_s": "step s",
    "peak_rss_mib": "peak RSS MiB",
    "peak_train_rss_mib": "train peak MiB",
    "opt_state_mib": "opt state MiB",
    "init_s": "init s",
}


def plan(only: str | None, installed: set[str]) -> tuple[list[str], dict[str, str]]:
    """Variants to run (each ``ours:`` followed by its anchor) and the skipped ones with the reason."""
    order: list[str] = []
    for name, variant in VARIANTS.items():
        if name.startswith("ours:"):
            order += [name] + ([variant.anchor] if variant.anchor and variant.anchor not in order else [])
    order += [v for v in VARIANTS if v not in order]
    if only:
        wanted = [v.strip() for v in only.split(",") if v.strip()]
        unknown = [v for v in wanted if v not in VARIANTS]
        if unknown:
            sys.exit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
        order = [v for v in order if v in wanted]
    skipped = {
        n: f"method '{VARIANTS[n].needs_method}' is not installed (pip install -e plugins/{VARIANTS[n].needs_method})"
        for n in order
        if VARIANTS[n].needs_method and VARIANTS[n].needs_method not in installed
    }
    still_anchoring = {VARIANTS[n].anchor for n in order if n not in skipped}
    for name in list(skipped):  # an anchor alone measures nothing of ours
        anchor = VARIANTS[name].anchor
        if anchor in order and anchor not in still_anchoring:
            skipped[anchor] = f"its counterpart {name} is skipped"
    return [v for v in order if v not in skipped], skipped


def median_of_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's repeated runs as one result: the median of every compared figure, each run's
    figures under ``"runs"``; the first failure instead if a run failed."""
    failed = next((r for r in runs if "error" in r), None)
    if failed is not None or len(runs) == 1:
        return failed or runs[0]
    result = {**runs[0], "runs": [{k: r[k] for k in RATIO_KEYS} for r in runs]}
    result.update({k: statistics.median(r[k] for r in runs) for k in RATIO_KEYS})
    return result


def add_ratios(results: dict[str, dict[str, Any]], versus: str | None) -> None:
    """``result["vs_anchor"][key] = ours / anchor`` (or / ``versus`` for every variant)."""
    for name, r in results.items():
        base = results.get(versus or VARIANTS[name].anchor or "", {})
        if "error" in r or "error" in base or not base:
            continue
        r["vs_anchor"] = {k: r[k] / base[k] if base.get(k) else None for k in RATIO_KEYS}
        r["anchor"] = versus or VARIANTS[name].anchor


def print_table(results: dict[str, dict[str, Any]]) -> None:
    """A markdown table: each figure with its ratio to the anchor."""
    print(
        "| variant | "
        + " | ".join(f"{label} | x anchor" for label in RATIO_KEYS.values())
        + " | trainable | eval loss |"
    )
    print("|---|" + "---|---|" * len(RATIO_KEYS) + "---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:120]} |" + " |" * (2 * len(RATIO_KEYS) + 1))
            continue
        ratios = r.get("vs_anchor", {})
        cells = [
            f"{figure(r[k])} | {ratios[k]:.2f}" if ratios.get(k) is not None else f"{figure(r[k])} | "
            for k in RATIO_KEYS
        ]
        print(f"| {name} | " + " | ".join(cells) + f" | {r['trainable_params']:,} | {r['eval_loss']:.4f} |")


def main(argv: list[str] | None = None) -> None:
    """Run every planned variant in a fresh process, print the ratio table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated variants: " + ", ".join(VARIANTS))
    parser.add_argument("--ratios-vs", help="compare every variant against this one instead of its own anchor")
    parser.add_argument("--output", default="benchmarks/results/anchors.json")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per variant")
    parser.add_argument("--table-from", metavar="JSON", help="print the table of an earlier run's JSON and exit")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the variants this many times, in turn (A B A B ...), and report each figure's median",
    )
    add_options(parser)
    ns = parser.parse_args(argv)
    if ns.table_from:
        print_table(json.loads(Path(ns.table_from).read_text())["results"])
        return
    options = options_from(ns)
    order, skipped = plan(ns.only, installed_methods())
    started_on = machine()
    repeats = max(1, ns.repeats)
    runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in order}
    # in turn rather than each variant's repeats back to back: a slow spell of a shared machine then
    # lands on every variant alike instead of on one
    for repeat in range(repeats):
        for i, variant in enumerate(order, 1):
            t0 = time.perf_counter()
            runs[variant].append(run_isolated(variant, options, ns.timeout))
            state = "FAILED: " + runs[variant][-1]["error"] if "error" in runs[variant][-1] else "done"
            print(
                f"[{repeat * len(order) + i}/{repeats * len(order)}] {variant}: {state} ({time.perf_counter() - t0:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
    results = {variant: median_of_runs(variant_runs) for variant, variant_runs in runs.items()}
    add_ratios(results, ns.ratios_vs)

    model = (
        f"width {options.width} x {options.layers} layers (from config)"
        if options.width
        else options.model or "SmolLM2-135M"
    )
    print(
        f"\n{model}, batch {options.batch_size} x {options.seq_len} tokens, rank {options.rank} (GaLore {options.galore_rank}), "
        f"median of {options.steps} steps after {options.warmup} warm-up"
        + (f"; each figure the median of {repeats} runs" if repeats > 1 else "")
        + "\n"
    )
    print_table(results)
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    document = {
        "command": command,
        "settings": {**vars(ns)},
        "machine": {**started_on, "load_average_end": machine()["load_average"]},
        "results": results,
        "skipped": skipped,
    }
    print(f"\nwrote {write_json(ns.output, document)}")


if __name__ == "__main__":
    main()
