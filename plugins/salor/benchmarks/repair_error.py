"""Eckart-Young on real SmolLM2-135M layers: how much of the pruning residual a rank-r repair removes.

For E = W - prune(W) (50%, unstructured per layer and 2:4) and r in (16, 64):
``||E - E_r||_F^2 / ||E||_F^2`` (exact SVD), the bound ``1 - r/min(d,k)``, and the same ratio with
the fast seeded randomized SVD (``svd="fast"``, 8 iterations) used by the quality study.

    python plugins/salor/benchmarks/repair_error.py     # prints a table, writes repair_error.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from hf_lowrank_plugins.app.embedded import default_model_dir
from hf_lowrank_salor.model import svd_repair
from hf_lowrank_salor.prune import magnitude_mask, semi_structured_mask

HERE = Path(__file__).resolve().parent
PROJ = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def main() -> None:
    """Print the table and write repair_error.json."""
    path = next(default_model_dir().glob("*.safetensors"))
    rows = []
    with safe_open(str(path), framework="pt") as fh:
        for layer in (0, 15, 29):
            for proj in PROJ:
                W = fh.get_tensor(f"model.layers.{layer}.{proj}.weight").float()
                for pattern, mask in (("unstructured", magnitude_mask(W, 0.5)), ("2:4", semi_structured_mask(W))):
                    E = W - torch.where(mask, W, torch.zeros(()))
                    S2 = torch.linalg.svdvals(E.double()) ** 2
                    total = float(S2.sum())
                    for r in (16, 64):
                        torch.manual_seed(0)
                        A, B = svd_repair(E, r, 1.0, niter=8)
                        fast = float((E - B @ A).double().pow(2).sum()) / total
                        rows.append(
                            {
                                "layer": layer,
                                "proj": proj,
                                "shape": list(W.shape),
                                "pattern": pattern,
                                "r": r,
                                "exact": float(S2[r:].sum()) / total,
                                "bound": 1 - r / min(W.shape),
                                "fast": fast,
                                "residual_over_weight": total / float(W.double().pow(2).sum()),
                            }
                        )
    (HERE / "repair_error.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| layer | proj | shape | pattern | ‖E‖²/‖W‖² | r | ‖E-E_r‖²/‖E‖² exact | bound 1-r/min | fast SVD |")
    print("|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        print(
            f"| {x['layer']} | {x['proj'].split('.')[-1]} | {x['shape'][0]}x{x['shape'][1]} | {x['pattern']} | "
            f"{x['residual_over_weight']:.3f} | {x['r']} | {x['exact']:.4f} | {x['bound']:.4f} | {x['fast']:.4f} |"
        )
    for pattern in ("unstructured", "2:4"):
        for r in (16, 64):
            sel = [x for x in rows if x["pattern"] == pattern and x["r"] == r]
            print(
                f"{pattern} r={r}: mean exact {sum(x['exact'] for x in sel) / len(sel):.4f}, mean bound "
                f"{sum(x['bound'] for x in sel) / len(sel):.4f}, mean fast {sum(x['fast'] for x in sel) / len(sel):.4f}, "
                f"bound holds on {sum(x['exact'] <= x['bound'] for x in sel)}/{len(sel)}"
            )


if __name__ == "__main__":
    main()
