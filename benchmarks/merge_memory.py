"""Peak memory of merging an adapter into its base, against loading and saving the base alone.

Each variant runs in a fresh process; its peak RSS comes from ``os.wait4`` (the kernel's high-water
mark of that process alone). Variants:

* ``load+save``: plain transformers loads the base at its checkpoint's dtype and saves it (the
  least any merge can cost: it has to read and write the same weights);
* ``load+save+imports``: the same with the libraries a merge imports (PEFT, bitsandbytes through
  it, this package: about 230 MiB of code and data before any weight), the floor for an adapter merge;
* ``ours``: ``hf-lowrank merge ADAPTER --base BASE --output-dir OUT``: from disk, the adapter on a
  meta-device skeleton and every base tensor read from the checkpoint as it is written (one layer
  in memory, so it can go below ``load+save``);
* ``ours:in-memory``: the base loaded whole, then the streaming writer (what ``export(merge=True)``
  does after training, where the model is already in memory);
* ``peft``: PEFT's ``merge_and_unload()`` in place, then ``save_pretrained``;
* ``deepcopy``: what we did before: a deep copy of the adapted model, merged, then saved.

Models: the embedded SmolLM2-135M, and a Llama-3.2-1B-shaped model built from its config (random
bf16 weights, saved once under ``--cache``). The adapter is LoRA r=16 on every linear layer with
random non-zero factors::

    .venv/bin/python benchmarks/merge_memory.py --out benchmarks/results/merge_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import figure, machine, write_json

BIN = Path(sys.executable).parent
LLAMA_1B = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": True,
}

PREPARE_1B = """
import sys, torch
from transformers import AutoModelForCausalLM, LlamaConfig
torch.manual_seed(0)
config = LlamaConfig(**{config})
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(sys.argv[1])
"""

PREPARE_ADAPTER = """
import sys, torch
import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.checkpoints import checkpoint_dtype, load_causal_lm
base = sys.argv[1]
model = load_causal_lm(base, checkpoint_dtype(base))
model.config.name_or_path = base
adapted = hlp.attach(model, "lora", r=16)
with torch.no_grad():
    for p in adapted.model.parameters():
        if p.requires_grad:
            p.normal_(0, 0.01)
hlp.save_adapter(adapted.model, sys.argv[2])
"""

VARIANTS = {
    "load+save": """
import sys
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
model.save_pretrained(sys.argv[3])
""",
    "load+save+imports": """
import sys
import peft  # noqa: F401  (what every adapter merge imports: peft, and bitsandbytes through it)
import hf_lowrank_plugins.app.cli  # noqa: F401
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
model.save_pretrained(sys.argv[3])
""",
    "ours:in-memory": """
import sys
import hf_lowrank_plugins as hlp
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
hlp.save_merged(hlp.load_adapter(model, sys.argv[2]).model, sys.argv[3])
""",
    "peft": """
import sys
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload(safe_merge=True)
model.save_pretrained(sys.argv[3])
""",
    "deepcopy": """
import sys
import hf_lowrank_plugins as hlp
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
adapted = hlp.load_adapter(model, sys.argv[2])
hlp.merged_copy(adapted.model).save_pretrained(sys.argv[3])
""",
}


def _run(argv: list[str]) -> tuple[float, float]:
    """Run ``argv``; its peak RSS in MiB (this process alone) and wall seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status:
        raise RuntimeError(f"{argv[:3]} failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    return usage.ru_maxrss / 1024, seconds


def _base(model: str, cache: Path) -> Path:
    if model == "smollm2-135m":
        from hf_lowrank_plugins.app.embedded import default_model_dir

        return default_model_dir()
    folder = cache / model
    if not (folder / "config.json").is_file():
        subprocess.run([sys.executable, "-c", PREPARE_1B.format(config=LLAMA_1B), str(folder)], check=True)
    return folder


def main() -> None:
    """Prepare each model and adapter, run every variant in its own process, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "llama-1b-bf16"])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "hf-lowrank-bench-models")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "merge_memory.json"))
    args = parser.parse_args()
    rows = []
    for model in args.models:
        base = _base(model, args.cache)
        with tempfile.TemporaryDirectory() as tmp:
            adapter = Path(tmp) / "adapter"
            subprocess.run([sys.executable, "-c", PREPARE_ADAPTER, str(base), str(adapter)], check=True)
            for variant in ("load+save", "load+save+imports", "ours", "ours:in-memory", "peft", "deepcopy"):
                out = Path(tmp) / variant
                if variant == "ours":
                    argv = [
                        str(BIN / "hf-lowrank"),
                        "merge",
                        str(adapter),
                        "--base",
                        str(base),
                        "--output-dir",
                        str(out),
                    ]
                else:
                    argv = [sys.executable, "-c", VARIANTS[variant], str(base), str(adapter), str(out)]
                peak, seconds = _run(argv)
                rows.append({"model": model, "variant": variant, "peak_rss_mib": peak, "seconds": seconds})
                shutil.rmtree(out, ignore_errors=True)
    print(f"{'model':<15} {'variant':<18} {'peak RSS MiB':>13} {'x load+save':>12} {'x +imports':>11} {'seconds':>8}")
    for r in rows:
        floors = {x["variant"]: x["peak_rss_mib"] for x in rows if x["model"] == r["model"]}
        r["ratio_to_load_save"] = r["peak_rss_mib"] / floors["load+save"]
        r["ratio_to_load_save_imports"] = r["peak_rss_mib"] / floors["load+save+imports"]
        print(
            f"{r['model']:<15} {r['variant']:<18} {figure(r['peak_rss_mib']):>13} "
            f"{r['ratio_to_load_save']:>12.3f} {r['ratio_to_load_save_imports']:>11.3f} {r['seconds']:>8.1f}"
        )
    write_json(args.out, {"command": " ".join(sys.argv), "machine": machine(), "results": rows})
    print(json.dumps({"written": args.out}))


if __name__ == "__main__":
    main()
