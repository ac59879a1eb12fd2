"""QPiSSA vs QLoRA quantization error on real SmolLM2 layers (nuclear norm, as in PiSSA's paper).

    QLoRA error  = || W - deq(NF4(W)) ||_*
    QPiSSA error = || W - (deq(NF4(W_res)) + s*B@A) ||_*   with W_res = W - s*B@A (top-r SVD)

The scaling s cancels (s*B@A = U_r S_r V_r^T for any s). NF4 with double quantization and block
size 64, the QLoRA recipe our qlora plugin uses. Prints a table and writes JSON.

    python plugins/pissa/benchmarks/qpissa_error.py [--model DIR] [--ranks 16 64 128] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hf_lowrank_plugins import QuantizationSettings
from hf_lowrank_plugins.quantization import roundtrip_4bit


def nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """deq(NF4(weight)) in fp32 as the core quantizes a layer (double quantization, block size 64)."""
    return roundtrip_4bit(weight, QuantizationSettings()).float()


def principal(weight: torch.Tensor, r: int, svd: str, niter: int, seed: int) -> torch.Tensor:
    """U_r S_r V_r^T (= s*B@A of PiSSA) from the exact or the seeded randomized SVD."""
    if svd == "exact":
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)
    return U @ torch.diag(S) @ V.T


def nuclear(x: torch.Tensor) -> float:
    """Nuclear norm (sum of singular values)."""
    return float(torch.linalg.matrix_norm(x, ord="nuc"))


def main() -> None:
    """Measure the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the cached SmolLM2-135M-Instruct)")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    parser.add_argument(
        "--modules",
        nargs="+",
        default=["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"],
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--svd", choices=["exact", "fast"], default="exact")
    parser.add_argument("--niter", type=int, default=16)
    parser.add_argument("--out", default="qpissa_error.json")
    args = parser.parse_args()
    if args.model is None:
        from hf_lowrank_plugins.app.embedded import default_model_dir

        args.model = str(default_model_dir())
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows = []
    header = f"{'layer':<28} {'shape':>10} {'QLoRA':>9} " + " ".join(
        f"{'QPiSSA r' + str(r):>12} {'ratio':>6}" for r in args.ranks
    )
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    for i in args.layers:
        for name in args.modules:
            W = model.get_submodule(f"model.layers.{i}.{name}").weight.detach().float()
            qlora = nuclear(W - nf4_roundtrip(W))
            row = {"layer": f"layers.{i}.{name}", "shape": list(W.shape), "qlora_nuclear": qlora, "qpissa_nuclear": {}}
            cells = []
            for r in args.ranks:
                top = principal(W, r, args.svd, args.niter, seed=0)
                err = nuclear(W - (nf4_roundtrip(W - top) + top))
                row["qpissa_nuclear"][r] = err
                cells.append(f"{err:>12.2f} {err / qlora:>6.3f}")
            rows.append(row)
            print(f"{row['layer']:<28} {'x'.join(map(str, W.shape)):>10} {qlora:>9.2f} " + " ".join(cells))
    mean = {r: sum(x["qpissa_nuclear"][r] / x["qlora_nuclear"] for x in rows) / len(rows) for r in args.ranks}
    print("mean QPiSSA/QLoRA ratio: " + ", ".join(f"r={r}: {v:.3f}" for r, v in mean.items()))
    out = {
        "model": args.model,
        "svd": args.svd,
        "niter": args.niter,
        "quant": "nf4, double quant, block 64",
        "rows": rows,
        "mean_ratio": mean,
        "seconds": time.perf_counter() - start,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
