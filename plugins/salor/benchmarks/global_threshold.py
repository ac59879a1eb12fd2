"""Memory and time of SALOR's global magnitude threshold: histograms layer by layer against one full sort.

The ``full-topk`` variant is what the plugin did before (and what a direct implementation does):
concatenate every target weight's magnitude in fp32 and ``torch.topk`` the kept count, which also
returns int64 indices (about 12 bytes per weight). ``histograms`` is
:func:`hf_lowrank_salor.prune.iter_global_masks`, consumed as ``attach_salor`` consumes it (one mask
alive at a time). Both run in a fresh process on random weights with the shapes of every linear
layer of a model (SmolLM2-135M, or a Llama-3.2-1B-shaped model in bf16) and report the peak RSS
above the weights themselves (a variant the machine cannot run is reported as failed)::

    python plugins/salor/benchmarks/global_threshold.py --out plugins/salor/benchmarks/global_threshold.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

from harness import figure, machine, reset_peak_rss, rss_kib, write_json  # noqa: E402  (needs the path above)

#: (hidden, intermediate, kv width, layers, dtype) of the models whose linear layers are pruned.
SHAPES = {
    "smollm2-135m": (576, 1536, 192, 30, "float32"),
    "llama-1b-bf16": (2048, 8192, 512, 16, "bfloat16"),
}
SPARSITY = 0.5


def _weights(model: str) -> dict:
    import torch

    hidden, inter, kv, layers, dtype = SHAPES[model]
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden)]
    shapes.append((hidden, inter))
    gen = torch.Generator().manual_seed(0)
    return {
        f"{i}.{j}": torch.randn(shape, generator=gen).to(getattr(torch, dtype))
        for i in range(layers)
        for j, shape in enumerate(shapes)
    }


def _worker(model: str, variant: str) -> None:
    import torch

    from hf_lowrank_salor.prune import iter_global_masks

    weights = _weights(model)
    before = rss_kib("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    kept = 0
    if variant == "histograms":
        for _, mask in iter_global_masks(weights, SPARSITY):
            kept += int(mask.sum())
    else:
        flat = torch.cat([w.detach().abs().float().flatten() for w in weights.values()])
        keep = flat.numel() - round(SPARSITY * flat.numel())
        indices = torch.topk(flat, keep, sorted=False).indices
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        mask[indices] = True
        kept = int(mask.sum())
    seconds = time.perf_counter() - start
    result = {
        "model": model,
        "variant": variant,
        "weights": sum(w.numel() for w in weights.values()),
        "kept": kept,
        "seconds": seconds,
        "extra_peak_mib": (rss_kib("VmHWM") - before) / 1024,
    }
    print("RESULT " + json.dumps(result))


def main() -> None:
    """Run every (model, variant) in its own process; print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(*args.worker)
        return
    rows = []
    for model in args.models:
        for variant in ("full-topk", "histograms"):
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", model, variant], capture_output=True, text=True
            )
            if proc.returncode:  # the full sort of a large model can exhaust the machine's memory
                reason = "killed (out of memory)" if proc.returncode == -9 else proc.stderr.strip().splitlines()[-1]
                rows.append({"model": model, "variant": variant, "failed": reason})
                continue
            rows.append(json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:]))
    print(f"{'model':<15} {'variant':<11} {'weights':>13} {'extra peak MiB':>15} {'bytes/weight':>13} {'seconds':>8}")
    for r in rows:
        if "failed" in r:
            print(f"{r['model']:<15} {r['variant']:<11} {r['failed']}")
            continue
        per_weight = r["extra_peak_mib"] * 2**20 / r["weights"]
        print(
            f"{r['model']:<15} {r['variant']:<11} {r['weights']:>13,} {figure(r['extra_peak_mib']):>15} "
            f"{per_weight:>13.2f} {r['seconds']:>8.2f}"
        )
    for model in args.models:
        pair = {r["variant"]: r for r in rows if r["model"] == model and "failed" not in r}
        if len(pair) < 2:
            continue
        assert pair["full-topk"]["kept"] == pair["histograms"]["kept"], "both keep the same count"
        print(
            f"{model}: histograms / full-topk extra peak = "
            f"{pair['histograms']['extra_peak_mib'] / pair['full-topk']['extra_peak_mib']:.3f}"
        )
    write_json(args.out, {"command": " ".join(sys.argv), "machine": machine(), "sparsity": SPARSITY, "results": rows})


if __name__ == "__main__":
    main()
