"""Checkpoint sizes of SmolLM2-135M: dense fp32/bf16 vs SALOR's bitmap-compressed base + adapter.

All target linear layers (all-linear, 210 matrices, 106M weights) pruned to 50% (unstructured and
2:4); embeddings (tied with the LM head) and norms stay dense. Sizes are the safetensors files
written by ``save_pretrained`` (dense) and ``save_compressed_model`` (compressed); the reload is
checked bit for bit.

    python plugins/salor/benchmarks/sizes.py     # prints a table, writes sizes.json
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.app.embedded import default_model_dir
from hf_lowrank_salor.export import directory_bytes, load_compressed_model, pruned_base_copy, save_compressed_model

HERE = Path(__file__).resolve().parent
MB = 2**20


def main() -> None:
    """Print the table and write sizes.json."""
    model_dir = default_model_dir()
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="salor-sizes-") as tmp:
        tmp = Path(tmp)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.save_pretrained(tmp / "dense32")
        model.to(torch.bfloat16).save_pretrained(tmp / "dense16")
        out["dense_fp32_bytes"] = directory_bytes(tmp / "dense32")
        out["dense_bf16_bytes"] = directory_bytes(tmp / "dense16")
        del model
        for pattern in ("unstructured", "2:4"):
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            adapted = hlp.attach(model, "salor", r=16, sparsity_pattern=pattern, svd="fast")
            base = pruned_base_copy(adapted.model)
            target = sum(m.base_layer.weight.numel() for _, m in adapted.model.named_modules() if hasattr(m, "lora_A"))
            for dtype in (torch.float32, torch.bfloat16):
                name = f"{pattern}_{str(dtype).removeprefix('torch.')}"
                started = time.perf_counter()
                sizes = save_compressed_model(adapted.model, tmp / name, values_dtype=dtype)
                encode_s = time.perf_counter() - started
                started = time.perf_counter()
                restored = load_compressed_model(tmp / name, with_adapter=False)
                decode_s = time.perf_counter() - started
                reference = base.to(dtype).state_dict()
                exact = all(
                    torch.equal(
                        restored.state_dict()[k].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                        v.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                    )
                    for k, v in reference.items()
                    if v.is_floating_point()
                )
                base.to(torch.float32)
                itemsize = 2 if dtype == torch.bfloat16 else 4
                other_dense = sizes["base_dense_bytes"] - target * itemsize
                adapter_bytes = sizes["adapter_bytes"] // (
                    2 if dtype == torch.bfloat16 else 1
                )  # adapter stored fp32; bf16 copy is half
                dense_ref = out["dense_bf16_bytes"] if dtype == torch.bfloat16 else out["dense_fp32_bytes"]
                out[name] = {
                    **sizes,
                    "target_weights": target,
                    "bit_exact_reload": exact,
                    "target_matrices_ratio": (sizes["base_stored_bytes"] - other_dense) / (target * itemsize),
                    "file_ratio_vs_dense_same_dtype": sizes["file_bytes"] / dense_ref,
                    "file_plus_adapter_ratio": (sizes["file_bytes"] + adapter_bytes) / dense_ref,
                    "adapter_bytes_same_dtype": adapter_bytes,
                    "encode_seconds": encode_s,
                    "decode_seconds": decode_s,
                }
            del adapted, model, base
    (HERE / "sizes.json").write_text(json.dumps(out, indent=2) + "\n")
    print(
        f"dense checkpoints: fp32 {out['dense_fp32_bytes'] / MB:.1f} MiB, bf16 {out['dense_bf16_bytes'] / MB:.1f} MiB"
    )
    print(
        "| base | values | pruned matrices vs dense | base file MiB | vs dense same dtype | + r=16 adapter | bit-exact reload | encode s | load s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key, v in out.items():
        if isinstance(v, dict):
            pattern, dtype = key.rsplit("_", 1)
            print(
                f"| {pattern} 50% | {dtype} | {v['target_matrices_ratio']:.4f}x | {v['file_bytes'] / MB:.1f} | "
                f"{v['file_ratio_vs_dense_same_dtype']:.3f}x | {v['file_plus_adapter_ratio']:.3f}x | {v['bit_exact_reload']} | "
                f"{v['encode_seconds']:.1f} | {v['decode_seconds']:.1f} |"
            )


if __name__ == "__main__":
    main()
