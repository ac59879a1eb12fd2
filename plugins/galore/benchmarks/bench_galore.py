"""Benchmark GaLore variants against transformers' GaLore and plain AdamW on SmolLM2-135M (CPU).

A thin front end to the repository's ``benchmarks/bench_anchors.py`` (one worker serves every
benchmark; see ``benchmarks/harness.py`` for what is measured): it runs the GaLore variants under
their historical names, with GaLore's settings and a constant learning rate, and reports every
variant as a ratio to plain AdamW (``adamw_full``)::

    python plugins/galore/benchmarks/bench_galore.py --steps 6 --batch 2 --seq-len 64 --out bench.json

Columns: optimizer state MiB (every tensor storage reachable from the state counted once),
peak RSS MiB of the process and of training alone, median step seconds after ``--warmup``,
eval loss after ``--steps``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

import bench_anchors  # noqa: E402  (needs the path above)

#: Historical variant names -> the shared benchmark's names.
VARIANTS = {
    "adamw_full": "full",
    "ours": "ours:galore",
    "ours_layerwise": "ours:galore_layerwise",
    "ours_8bit": "ours:galore_8bit",
    "hf_galore_adamw": "hf:galore_adamw",
    "hf_galore_adamw_layerwise": "hf:galore_adamw_layerwise",
    "ours_adafactor": "ours:galore_adafactor",
    "hf_galore_adafactor": "hf:galore_adafactor",
}


def main() -> None:
    """Translate this script's flags to ``bench_anchors.py`` and run it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS)
    )
    parser.add_argument(
        "--model", default=None, help="model dir (default: hf_lowrank_plugins.app.data.default_model_dir())"
    )
    parser.add_argument("--steps", type=int, default=6, help="total steps, warm-up included")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--update-proj-gap", type=int, default=200)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench_galore.json")
    opts = parser.parse_args()
    unknown = [v for v in opts.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    argv = [
        "--only",
        ",".join(VARIANTS[v] for v in opts.variants.split(",")),
        "--ratios-vs",
        "full",
        "--steps",
        str(max(1, opts.steps - opts.warmup)),
        "--warmup",
        str(opts.warmup),
        "--batch-size",
        str(opts.batch),
        "--seq-len",
        str(opts.seq_len),
        "--eval-blocks",
        str(opts.eval_blocks),
        "--lr",
        str(opts.lr),
        "--lr-scheduler",
        "constant",
        "--galore-rank",
        str(opts.rank),
        "--update-proj-gap",
        str(opts.update_proj_gap),
        "--scale",
        str(opts.scale),
        "--threads",
        str(opts.threads),
        "--output",
        opts.out,
    ] + (["--model", opts.model] if opts.model else [])
    bench_anchors.main(argv)


if __name__ == "__main__":
    main()
