"""Benchmark GaLore variants against transformers' GaLore and plain AdamW on SmolLM2-135M (CPU).

Each variant runs in a fresh subprocess (so peak RSS is its own) and reports:

* ``opt_state_mib``: bytes held by the optimizer state (every tensor storage counted once, so a
  sliced SVD factor counts the whole factor it keeps alive; galore-torch projector objects included),
* ``peak_rss_mib``: the process's peak resident memory during ``trainer.train()`` (the high-water
  mark is reset just before training through ``/proc/self/clear_refs`` where the kernel allows),
* ``step_s``: median wall time of an optimizer step after ``--warmup`` steps,
* ``eval_loss``: loss on held-out blocks after ``--steps`` steps.

Usage::

    python plugins/galore/benchmarks/bench_galore.py --steps 6 --batch 2 --seq-len 64 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = {
    "adamw_full": "plain AdamW, full fine-tuning (baseline)",
    "ours": "hf-lowrank galore (adamw)",
    "ours_layerwise": "hf-lowrank galore, layerwise=True",
    "ours_8bit": "hf-lowrank galore, optimizer=adamw8bit",
    "hf_galore_adamw": "transformers optim=galore_adamw",
    "hf_galore_adamw_layerwise": "transformers optim=galore_adamw_layerwise",
}
#: Same layers for every GaLore variant: all linear layers except the (tied) output head.
HF_TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _rss_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    """Reset VmHWM so the peak measures training only; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of all tensors reachable from the optimizer state, each storage counted once."""
    while hasattr(optimizer, "optimizer"):  # accelerate's wrapper
        optimizer = optimizer.optimizer
    optimizers = list(getattr(optimizer, "optimizer_dict", {}).values()) or [optimizer]
    seen: set[int] = set()
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        import torch

        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif hasattr(value, "ortho_matrix"):  # galore-torch's GaLoreProjector object
            visit(value.ortho_matrix)

    for opt in optimizers:
        for state in opt.state.values():
            visit(state)
    return total


def run_variant(variant: str, opts: argparse.Namespace) -> dict[str, Any]:
    """Train one variant in this process and return its measurements."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from hf_lowrank_plugins import attach
    from hf_lowrank_plugins.data import default_model_dir, load_blocks

    torch.set_num_threads(opts.threads)
    model_dir = opts.model or str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_ds, eval_ds = load_blocks(None, tokenizer, opts.seq_len, max_blocks=opts.batch * opts.steps + opts.eval_blocks,
                                    eval_blocks=opts.eval_blocks)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    kw: dict[str, Any] = {}
    extra_args: dict[str, Any] = {}
    galore = dict(rank=opts.rank, update_proj_gap=opts.update_proj_gap, scale=opts.scale)
    if variant.startswith("ours"):
        adapted = attach(model, "galore", layerwise=variant == "ours_layerwise",
                         optimizer="adamw8bit" if variant == "ours_8bit" else "adamw", **galore)
        model, kw = adapted.model, adapted.trainer_kwargs()
    elif variant.startswith("hf_"):
        extra_args = dict(optim=variant.removeprefix("hf_"), optim_target_modules=HF_TARGETS,
                          optim_args=",".join(f"{k}={v}" for k, v in galore.items()))

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=opts.steps, per_device_train_batch_size=opts.batch,
            per_device_eval_batch_size=opts.batch, learning_rate=opts.lr, logging_steps=1, save_strategy="no",
            report_to=[], use_cpu=True, disable_tqdm=True, seed=0, lr_scheduler_type="constant", **extra_args,
        )
        callbacks = kw.pop("callbacks", []) + [Timer()]
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, callbacks=callbacks, **kw)
        rss_before = _rss_kib("VmRSS")
        reset = _reset_peak_rss()
        trainer.train()
        peak = _rss_kib("VmHWM")
        state_bytes = optimizer_state_bytes(trainer.optimizer)
        eval_loss = trainer.evaluate()["eval_loss"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "variant": variant,
        "description": VARIANTS[variant],
        "opt_state_mib": state_bytes / 2**20,
        "peak_rss_mib": peak / 1024,
        "rss_before_train_mib": rss_before / 1024,
        "peak_is_train_only": reset,
        "step_s": statistics.median(times[opts.warmup:] or times),
        "eval_loss": eval_loss,
        "train_losses": losses,
    }


def main() -> None:
    """Run every variant in a fresh subprocess, print a table with ratios to AdamW, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--model", default=None, help="model dir (default: hf_lowrank_plugins.data.default_model_dir())")
    parser.add_argument("--steps", type=int, default=6)
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
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    opts = parser.parse_args()

    if opts.one:
        print("BENCH_RESULT " + json.dumps(run_variant(opts.one, opts)), flush=True)
        return

    results = []
    for variant in opts.variants.split(","):
        cmd = [sys.executable, __file__, "--one", variant] + [a for a in sys.argv[1:]]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH_RESULT ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            results.append({"variant": variant, "description": VARIANTS.get(variant, ""), "error": " | ".join(tail)})
            print(f"{variant}: FAILED ({' | '.join(tail)})", file=sys.stderr)
            continue
        result = json.loads(line.removeprefix("BENCH_RESULT "))
        result["wall_s"] = time.perf_counter() - t0
        results.append(result)
        print(f"{variant}: done in {result['wall_s']:.0f}s", file=sys.stderr)

    base = next((r for r in results if r["variant"] == "adamw_full" and "error" not in r), None)
    header = f"| variant | opt state MiB | x AdamW | peak RSS MiB (train) | x AdamW | step s (median) | x AdamW | eval loss |"
    print(header)
    print("|" + "---|" * 9)
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error'][:80]} | | | | | | |")
            continue

        def ratio(key: str) -> str:
            return f"{r[key] / base[key]:.2f}" if base and base[key] else "-"

        print(f"| {r['variant']} | {r['opt_state_mib']:.1f} | {ratio('opt_state_mib')} | {r['peak_rss_mib']:.0f} | "
              f"{ratio('peak_rss_mib')} | {r['step_s']:.2f} | {ratio('step_s')} | {r['eval_loss']:.4f} |")
    meta = {k: v for k, v in vars(opts).items() if k != "one"}
    Path(opts.out).write_text(json.dumps({"settings": meta, "results": results}, indent=2))
    print(f"wrote {opts.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
