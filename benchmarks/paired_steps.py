"""Step-time ratios measured in one process, round by round, so that the machine's drift cancels.

    .venv/bin/python benchmarks/paired_steps.py --variants ours:lora,ours:dora,peft:dora,limit:frozen \
        --reference ours:lora [--steps 20] [--warmup 3] [--batch-size 2] [--seq-len 64] [--rank 16] [--output FILE] \
        [--compile]

A variant named with ``+compiled`` (``ours:lora+compiled``) is that variant wrapped in ``torch.compile``;
``--compile`` compiles every variant.

``bench_anchors.py`` runs each variant in its own process, which isolates its memory but leaves its
step time exposed to the machine's speed at that moment: on a shared 2-core machine that drifts by
10-25% over minutes, the ratio of two separate runs moves by as much as the differences being
measured. Here every variant is built once in this process (the same variants as the harness, the
Trainer's optimizer from ``Trainer.create_optimizer``), and each of ``--steps`` rounds times one training
step of every variant back to back (forward, backward, gradient clipping at the Trainer's 1.0, optimizer
step, gradients released), in an order that rotates from round to round. A variant's ratio to
the reference is taken within each round and the median over rounds is reported, beside each
variant's median step time and the medians of its three phases (:data:`PHASES`: forward and
backward, clipping, optimizer step with the gradients released), so that a gap between two
variants can be put where it is spent. Memory is not measured here (the variants share the process): use
``bench_anchors.py`` for that. Variants that need the Trainer's callbacks (LoRA-GA's data-dependent
initialisation, GaLore's optimizer hooks) are refused: their steps here would not be theirs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from typing import Any

from harness import (
    VARIANTS,
    BenchOptions,
    add_options,
    build_variant,
    figure,
    load_model,
    machine,
    options_from,
    write_json,
)


def build(variant: str, o: BenchOptions, tokenizer: Any, workdir: str) -> tuple[Any, Any]:
    """The model of ``variant`` and the optimizer its Trainer would build."""
    from transformers import Trainer, TrainingArguments

    from hf_lowrank_plugins import get_registry

    method = VARIANTS[variant].needs_method
    if method and get_registry().get(method).needs_trainer_hooks:
        raise SystemExit(
            f"{variant} needs the Trainer's callbacks to train as itself; measure it with bench_anchors.py"
        )
    model, trainer_kw, extra_args = build_variant(variant, load_model(variant, o, tokenizer), None, o)
    args = TrainingArguments(
        output_dir=workdir, learning_rate=o.lr, per_device_train_batch_size=o.batch_size, report_to=[], **extra_args
    )
    trainer = Trainer(model=model, args=args, **trainer_kw)
    return model, trainer.create_optimizer()


#: Appended to a variant's name (``ours:dora+compiled``): that variant's model wrapped in ``torch.compile``,
#: so eager and compiled steps of one method are paired round by round.
COMPILED = "+compiled"


def base_variant(name: str) -> str:
    """The harness variant a (possibly ``+compiled``) name builds."""
    return name.removesuffix(COMPILED)


#: The parts of :func:`train_step` timed on their own, in order.
PHASES = ("forward_backward", "clip", "optimizer")


def train_step(model: Any, optimizer: Any, batch: dict[str, Any], max_grad_norm: float = 1.0) -> dict[str, float]:
    """One training step as the Trainer takes it; returns the wall seconds of each of :data:`PHASES`."""
    import torch

    marks = [time.perf_counter()]
    model(**batch).loss.backward()
    marks.append(time.perf_counter())
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    marks.append(time.perf_counter())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    marks.append(time.perf_counter())
    return {phase: end - start for phase, start, end in zip(PHASES, marks, marks[1:], strict=False)}


def paired_ratios(times: dict[str, list[float]], reference: str) -> dict[str, float]:
    """Each variant's median over rounds of (its step / the reference's step in the same round)."""
    return {
        name: statistics.median(mine / ref for mine, ref in zip(steps, times[reference], strict=True))
        for name, steps in times.items()
    }


def main() -> None:
    """Build the variants, time the interleaved rounds, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", required=True, help="comma-separated variants of harness.VARIANTS")
    parser.add_argument("--reference", help="the variant every ratio is taken against (default: the first)")
    parser.add_argument("--output", default="benchmarks/results/paired_steps.json")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="wrap every variant's model in torch.compile (inductor), as TrainingArguments(torch_compile=True) "
        "does; the warm-up rounds then include the compilation. A single variant is compiled by appending "
        f"{COMPILED} to its name (ours:lora,ours:lora{COMPILED}: the compile gain, paired)",
    )
    add_options(parser, BenchOptions(steps=20, warmup=3))  # --steps: rounds measured
    ns = parser.parse_args()
    o = options_from(ns)
    names = [v.strip() for v in ns.variants.split(",") if v.strip()]
    unknown = [v for v in names if base_variant(v) not in VARIANTS or v.startswith("hf:")]
    if unknown:
        raise SystemExit(f"unknown or unsupported variant(s): {', '.join(unknown)} (hf: optimizers need the Trainer)")
    reference = ns.reference or names[0]
    if reference not in names:
        raise SystemExit(f"--reference {reference} is not among --variants")

    import torch
    from transformers import AutoTokenizer

    from hf_lowrank_plugins.app.embedded import default_model_dir

    if o.threads:
        torch.set_num_threads(o.threads)
    tokenizer = AutoTokenizer.from_pretrained(o.model if o.model and o.width is None else default_model_dir())
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (o.batch_size, o.seq_len), generator=generator)
    batch = {"input_ids": ids, "labels": ids}
    with tempfile.TemporaryDirectory() as workdir:
        built = {name: build(base_variant(name), o, tokenizer, workdir) for name in names}
        for model, _ in built.values():
            model.train()
        built = {
            name: (torch.compile(model) if ns.compile or name.endswith(COMPILED) else model, optimizer)
            for name, (model, optimizer) in built.items()
        }
        phases: dict[str, dict[str, list[float]]] = {name: {phase: [] for phase in PHASES} for name in names}
        for round_index in range(o.warmup + o.steps):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                step_phases = train_step(*built[name], batch)
                if round_index >= o.warmup:
                    for phase, seconds in step_phases.items():
                        phases[name][phase].append(seconds)
            print(f"round {round_index + 1}/{o.warmup + o.steps}", file=sys.stderr, flush=True)
    times = {name: [sum(step) for step in zip(*phases[name].values(), strict=True)] for name in names}
    ratios = paired_ratios(times, reference)
    rows = {
        name: {
            "median_step_s": statistics.median(steps),
            "ratio": ratios[name],
            "phases_median_s": {phase: statistics.median(seconds) for phase, seconds in phases[name].items()},
            "step_s": steps,
        }
        for name, steps in times.items()
    }
    print(
        f"\n{o.batch_size} x {o.seq_len} tokens, rank {o.rank}, {'compiled, ' if ns.compile else ''}"
        f"{o.steps} rounds after {o.warmup} warm-up; "
        f"ratio: median over rounds of step / {reference}'s step in the same round\n"
    )
    print(f"| variant | median step s | ratio | {' | '.join(f'{p} s' for p in PHASES)} | description |")
    print("|---" * (4 + len(PHASES)) + "|")
    for name, row in rows.items():
        parts = " | ".join(figure(row["phases_median_s"][p]) for p in PHASES)
        print(
            f"| {name} | {figure(row['median_step_s'])} | {row['ratio']:.3f} | {parts} | "
            f"{VARIANTS[base_variant(name)].description} |"
        )
    document = {
        "command": " ".join(sys.argv),
        "settings": vars(ns),
        "machine": machine(),
        "reference": reference,
        "results": rows,
    }
    print(f"\nwrote {write_json(ns.output, document)}")


if __name__ == "__main__":
    main()
