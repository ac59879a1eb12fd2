"""CPU forward latency of SmolLM2-135M: dense vs SALOR (PEFT layers, fused module, CSR base, merged).

One forward pass (prefill) over batch x tokens, fp32, median of ``--repeats`` after 2 warm-ups,
each variant's output checked against the SALOR PEFT model (max relative logit error). SALOR is
attached at 50% unstructured sparsity (and 2:4 for the CSR row), r=16, all-linear; adapters are
moved off their init so they are not trivially structured.

    python plugins/salor/benchmarks/inference_speed.py [--tokens 128] [--batch 1] [--repeats 7]

prints a table and writes inference_speed.json. 2:4 semi-structured kernels need CUDA: on a
machine without a GPU that row is reported as not run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.app.embedded import default_model_dir
from hf_lowrank_salor import build_inference_model

HERE = Path(__file__).resolve().parent


@torch.no_grad()
def timed(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of one forward, and its logits."""
    for _ in range(2):
        out = model(input_ids=ids).logits
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = model(input_ids=ids).logits
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def main() -> None:
    """Print the table and write inference_speed.json."""
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    ns = p.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (ns.batch, ns.tokens))
    rows = {}
    dense = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    rows["dense model"] = timed(dense, ids, ns.repeats)
    adapted = hlp.attach(dense, "salor", r=16, svd="fast").model.eval()
    with torch.no_grad():  # stand-in for training
        g = torch.Generator().manual_seed(0)
        for n, prm in adapted.named_parameters():
            if "lora_B" in n:
                prm.add_(1e-3 * torch.randn(prm.shape, generator=g))
    rows["SALOR, PEFT layers (training form)"] = timed(adapted, ids, ns.repeats)
    ref = rows["SALOR, PEFT layers (training form)"][1]
    for label, kw in (
        ("SALOR inference module, unfused, dense base", dict(fuse=False)),
        ("SALOR inference module, fused adapters, dense base", dict(fuse=True)),
        ("SALOR inference module, fused adapters + fused base", dict(fuse=True, fuse_base=True)),
        ("SALOR inference module, fused adapters, CSR base", dict(fuse=True, base_format="csr")),
    ):
        rows[label] = timed(build_inference_model(adapted, **kw), ids, ns.repeats)
    rows["SALOR merged (W_s + s*B@A, dense)"] = timed(hlp.merged_copy(adapted), ids, ns.repeats)
    out = {
        "tokens": ns.tokens,
        "batch": ns.batch,
        "repeats": ns.repeats,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "rows": {},
    }
    base = rows["dense model"][0]
    print(f"batch {ns.batch} x {ns.tokens} tokens, fp32, {torch.get_num_threads()} threads")
    print("| variant | median ms | vs dense | max rel. logit diff vs SALOR PEFT |")
    print("|---|---|---|---|")
    for label, (seconds, logits) in rows.items():
        err = None if label == "dense model" else float((logits - ref).abs().max() / ref.abs().max())
        out["rows"][label] = {"median_seconds": seconds, "vs_dense": seconds / base, "rel_err_vs_peft": err}
        shown = "n/a (unpruned model)" if err is None else f"{err:.1e}"
        print(f"| {label} | {seconds * 1e3:.1f} | {seconds / base:.2f}x | {shown} |")
    out["rows"]["2:4 semi-structured (torch.sparse.to_sparse_semi_structured)"] = (
        "not run: needs CUDA" if not torch.cuda.is_available() else "run benchmarks on the GPU with base_format='2:4'"
    )
    (HERE / "inference_speed.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
