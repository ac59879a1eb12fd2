"""Our methods against their anchors, side by side on one model and batch, a fresh process each.

    .venv/bin/python benchmarks/bench_anchors.py [--steps 6] [--warmup 2] [--batch-size 2] [--seq-len 64]

Variants: ``ours:<method>`` (attach + Trainer) and ``peft:<method>`` (plain PEFT + Trainer), plus
``full`` (full fine-tuning, the Trainer's default AdamW). Per variant: median step seconds after
warm-up, peak RSS of the process, RSS after setup (model + adapter ready), trainable parameters,
setup seconds. Prints a table with ours/anchor ratios and writes JSON (``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "ours:lora": "peft:lora",
    "ours:qlora": "peft:qlora",
    "full": None,
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(variant: str, ns: argparse.Namespace) -> dict:
    """Run one variant in this process and return its measurements."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from hf_lowrank_plugins import QuantizationSettings, attach
    from hf_lowrank_plugins.data import default_model_dir, load_blocks

    model_dir = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, _ = load_blocks(None, tokenizer, ns.seq_len, max_blocks=(ns.steps + ns.warmup) * ns.batch_size + 1, eval_blocks=1)
    torch.manual_seed(0)
    started = time.perf_counter()
    kind, _, method = variant.partition(":")
    quantized = method == "qlora"
    load_kw = {"dtype": torch.float32}
    if quantized:  # both sides load straight in 4-bit: the path for models that do not fit in fp32
        from hf_lowrank_qlora import bnb_config

        load_kw["quantization_config"] = bnb_config(QuantizationSettings(compute_dtype=torch.float32))
    model = AutoModelForCausalLM.from_pretrained(model_dir, **load_kw)
    extra: dict = {}
    if kind == "ours":
        adapted = attach(model, method, r=ns.rank, lora_alpha=ns.rank)
        model, extra = adapted.model, adapted.trainer_kwargs()
    elif kind == "peft":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if quantized:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(r=ns.rank, lora_alpha=ns.rank, target_modules="all-linear", task_type="CAUSAL_LM"))
    setup_seconds = time.perf_counter() - started
    rss_after_setup = _rss_mb()

    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self.t)

    args = TrainingArguments(
        output_dir=str(Path(ns.tmp) / variant.replace(":", "_")), max_steps=ns.steps + ns.warmup,
        per_device_train_batch_size=ns.batch_size, learning_rate=1e-4, logging_steps=1, save_strategy="no",
        report_to=[], disable_tqdm=True, seed=0,
    )
    callbacks = [Timer(), *extra.pop("callbacks", [])]
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=callbacks, **extra)
    trainer.train()
    measured = step_times[ns.warmup:]
    return {
        "variant": variant,
        "median_step_s": statistics.median(measured),
        "min_step_s": min(measured),
        "peak_rss_mb": _rss_mb(),
        "rss_after_setup_mb": rss_after_setup,
        "setup_s": setup_seconds,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "final_loss": [e["loss"] for e in trainer.state.log_history if "loss" in e][-1],
    }


def main() -> None:
    """Run every variant in a fresh subprocess and print/write the comparison."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--output", default="benchmarks/results/anchors.json")
    parser.add_argument("--tmp", default="/tmp/hf-lowrank-bench")
    parser.add_argument("--only", help="comma-separated variants")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker:
        print("RESULT " + json.dumps(worker(ns.worker, ns)))
        return

    order = [v for pair in VARIANTS.items() for v in pair if v]
    if ns.only:
        order = [v for v in order if v in ns.only.split(",")]
    results = {}
    for variant in order:
        cmd = [sys.executable, __file__, "--worker", variant, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        results[variant] = json.loads(line[7:]) if line else {"variant": variant, "error": proc.stderr.strip().splitlines()[-1:]}
        print(f"  done {variant}", file=sys.stderr)

    print(f"\nSmolLM2-135M, batch {ns.batch_size} x {ns.seq_len} tokens, rank {ns.rank}, median of {ns.steps} steps after {ns.warmup} warm-up\n")
    print(f"{'variant':<12} {'step s':>8} {'peak RSS MB':>12} {'setup RSS MB':>13} {'trainable':>12} {'vs anchor (time, peak)':>24}")
    for variant, r in results.items():
        if "error" in r:
            print(f"{variant:<12} failed: {r['error']}")
            continue
        anchor = results.get(VARIANTS.get(variant) or "", {})
        ratio = ""
        if "median_step_s" in anchor:
            r["step_ratio_vs_anchor"] = r["median_step_s"] / anchor["median_step_s"]
            r["peak_ratio_vs_anchor"] = r["peak_rss_mb"] / anchor["peak_rss_mb"]
            ratio = f"{r['step_ratio_vs_anchor']:.2f}x, {r['peak_ratio_vs_anchor']:.2f}x"
        print(f"{variant:<12} {r['median_step_s']:>8.3f} {r['peak_rss_mb']:>12.0f} {r['rss_after_setup_mb']:>13.0f} {r['trainable_params']:>12,} {ratio:>24}")
    out = Path(ns.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(ns), "machine": f"{os.cpu_count()} CPU cores", "results": results}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
