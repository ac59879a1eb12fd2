"""Eval-time cost of DoRA on one SmolLM2-sized layer: PEFT's and ours, cached, merged, vs LoRA and the base.

PEFT's DoRA forward rebuilds B@A (through an identity matrix) and the row norms of W + s*B@A on
every call; ours takes the norms from W A^T and A A^T (``lowrank_norm``); caching reuses the norms
in eval mode, merging folds everything into W. Prints median milliseconds per forward and writes
JSON beside this script::

    .venv/bin/python plugins/dora/benchmarks/inference_speed.py [--in-features 576 --out-features 1536]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from hf_lowrank_dora import fast_inference
from hf_lowrank_dora.lowrank_norm import use_low_rank_norms


def median_ms(fn, x: torch.Tensor, repeats: int, warmup: int = 5) -> float:
    """Median wall time of ``fn(x)`` in milliseconds, under ``torch.no_grad``."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def build(in_f: int, out_f: int, r: int, use_dora: bool) -> torch.nn.Module:
    """One linear layer with a trained-looking (non-zero B) LoRA or DoRA adapter, in eval mode."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False))
    model = get_peft_model(layer, LoraConfig(r=r, lora_alpha=r, use_dora=use_dora, target_modules=["0"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return model.eval()


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-features", type=int, default=576)
    parser.add_argument("--out-features", type=int, default=1536)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--shapes", default="1x1,1x32,8x128", help="batch x tokens, comma separated")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lora = build(args.in_features, args.out_features, args.rank, use_dora=False)
    peft_dora = build(args.in_features, args.out_features, args.rank, use_dora=True)
    dora = copy.deepcopy(peft_dora)
    use_low_rank_norms(dora)
    base = lora.get_base_model()
    rows = []
    print(f"layer {args.out_features}x{args.in_features}, r={args.rank}, {args.threads} threads, median ms per forward")
    print(
        f"{'batch x tokens':>15} {'base':>8} {'LoRA':>8} {'PEFT DoRA':>10} {'DoRA':>8} {'DoRA cached':>12} {'DoRA merged':>12}"
    )
    for shape in args.shapes.split(","):
        b, t = map(int, shape.split("x"))
        x = torch.randn(b, t, args.in_features)
        row = {
            "shape": shape,
            "base": median_ms(base, x, args.repeats),
            "lora": median_ms(lora, x, args.repeats),
            "peft_dora": median_ms(peft_dora, x, args.repeats),
            "dora": median_ms(dora, x, args.repeats),
        }
        with fast_inference(dora, mode="cache") as m:
            row["dora_cached"] = median_ms(m, x, args.repeats)
        with fast_inference(dora, mode="merge") as m:
            row["dora_merged"] = median_ms(m, x, args.repeats)
        rows.append(row)
        print(
            f"{shape:>15} {row['base']:>8.3f} {row['lora']:>8.3f} {row['peft_dora']:>10.3f} {row['dora']:>8.3f} "
            f"{row['dora_cached']:>12.3f} {row['dora_merged']:>12.3f}"
        )
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
