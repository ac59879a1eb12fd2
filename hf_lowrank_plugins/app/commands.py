"""The ``hf-lowrank`` commands, one function each, called with the parsed arguments; each returns the
exit status. Everything heavy (torch, plugins) is imported inside them, so ``--help`` and argument
errors never pay for it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..errors import LowRankError
from .parser import parse_lr, parse_scoped_set, parse_set, spec_from
from .spec import TrainSpec


def train_command(ns: argparse.Namespace) -> int:
    """`hf-lowrank train`: one run of one method, its outputs and one report line."""
    from .train import run_training

    spec = spec_from(ns, "train", method=ns.method, settings=parse_set(ns.set))
    metrics = run_training(spec)
    if "rank" in metrics:  # another process of a launch: rank 0 reports the run
        return 0
    print(
        f"{metrics['method']}: eval loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss_after']:.4f} "
        f"after {metrics['steps']} steps ({metrics['train_seconds']:.1f}s, peak {metrics['peak_memory_mb']:.0f} MB, "
        f"{metrics['trainable_params']:,} trainable parameters); wrote {spec.resolved_output_dir()}"
    )
    return 0


def compare_command(ns: argparse.Namespace) -> int:
    """`hf-lowrank compare`: several methods on one budget; 1 only when none trained."""
    from .compare import CompareSpec, run_comparison

    default_lr, lr_overrides = parse_lr(ns.lr)
    methods = [m.strip() for m in ns.methods.split(",") if m.strip()] if ns.methods else None  # None: all installed
    spec = CompareSpec(
        methods=methods,
        run=spec_from(ns, "run"),
        output_dir=ns.output_dir,
        lr=default_lr,
        lr_overrides=lr_overrides,
        settings=parse_scoped_set(ns.set),
        reference=ns.reference,
        timeout=ns.timeout,
        overwrite=ns.overwrite,
    )
    comparison = run_comparison(spec, log=lambda line: print(line, flush=True))
    # a failing method is a row of the comparison, not a failed command; only "nothing trained" is
    return 1 if all(r["status"] != "ok" for r in comparison["results"]) else 0


def list_command(ns: argparse.Namespace) -> int:
    """`hf-lowrank list`: the installed methods (from the plugin index), or one method's options."""
    from ..method import describe_fields
    from ..registry import get_registry, split_claims

    registry = get_registry()
    if ns.method:
        info = registry.get(ns.method)
        fields = describe_fields(info.config_class)
        if ns.json:
            print(
                json.dumps({**info.as_dict(), "fields": [dataclasses.asdict(f) for f in fields]}, indent=2, default=str)
            )
            return 0
        print(f"{info.name} ({info.distribution} {info.version}): {info.summary}")
        aliases = ", ".join(f"--{a} -> {t}" for a, t in info.aliases.items() if a != t) or "none"
        quantized = "yes" if info.supports_quantized_base else f"no: {info.no_quantized_base}"
        lr = info.default_lr if info.default_lr is not None else "the reference method's"
        print(f"default learning rate: {lr}; 4-bit base: {quantized}; aliases: {aliases}")
        zero = f"up to ZeRO-{info.max_zero_stage}" if info.max_zero_stage else "without ZeRO only"
        zero += f" ({info.zero_reason})" if info.max_zero_stage < 3 else ""
        fsdp = "allowed (GPUs only; see docs/distributed.md)" if info.no_fsdp is None else f"no: {info.no_fsdp}"
        print(f"DeepSpeed: {zero}; FSDP: {fsdp}")
        print(f"\noptions (--set KEY=VALUE; {info.config_class.__name__}):")
        for f in fields:
            allowed = f" [{f.allowed}]" if f.allowed else ""
            print(f"  {f.name} = {f.default!r} ({f.type}){allowed}")
            if f.help:  # the first sentence; --json has all of it
                first = f.help.split(". ")[0].rstrip(".")
                print(f"      {first[:157] + '...' if len(first) > 160 else first}")
        return 0
    # from the plugin index: imports no plugin it remembers
    unique, conflicts = split_claims(registry.declarations(), lambda declared: str(declared["name"]))
    methods = list(unique.values())
    if ns.json:
        print(
            json.dumps(
                {
                    "methods": methods,
                    "failed": registry.failed,
                    "conflicts": conflicts,
                    "entry_point_clashes": registry.clashes,
                },
                indent=2,
            )
        )
        return 0
    rows = [
        (m["name"], m["version"], m["distribution"], m["config_class"].rsplit(".", 1)[-1], m["summary"])
        for m in methods
    ]
    header = ("method", "version", "distribution", "config", "summary")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    for name, claims in conflicts.items():
        claimers = " and ".join(f"{c['distribution'] or c['plugin']} (plugin '{c['plugin']}')" for c in claims)
        print(
            f"method '{name}' is claimed by {claimers}: it cannot run until one is blocked "
            f"(HF_LOWRANK_BLOCK_PLUGINS={claims[-1]['plugin']})",
            file=sys.stderr,
        )
    for name, dists in registry.clashes.items():
        print(
            f"entry point '{name}' is declared by {' and '.join(dists)}; both were loaded, the second as "
            f"'{name}@{dists[-1]}'",
            file=sys.stderr,
        )
    for name, error in registry.failed.items():
        print(f"failed to load plugin '{name}': {error}", file=sys.stderr)
    if not rows:
        print("no methods installed: pip install -e plugins/lora (or any hf-lowrank-<method>)", file=sys.stderr)
    return 0


def merge_command(ns: argparse.Namespace) -> int:
    """`hf-lowrank merge`: a saved adapter merged into its base, from disk."""
    from ..checkpoints import torch_dtype
    from ..merge import merge_adapter

    dtype = None if ns.merged_dtype == "auto" else torch_dtype(ns.merged_dtype)
    base = merge_adapter(
        ns.adapter_dir, ns.output_dir, ns.base, ns.revision, merged_dtype=dtype, overwrite=ns.overwrite
    )
    print(f"merged {ns.adapter_dir} into {base}: wrote {ns.output_dir}")
    return 0


def plan_command(ns: argparse.Namespace) -> int:
    """`hf-lowrank plan`: the predicted peak memory of a run, per term."""
    from ..checkpoints import torch_dtype
    from ..plan import plan_memory
    from ..sources import resolve_model
    from ..types import PlanSettings
    from .embedded import default_model_dir

    # --set, --rank and --alpha become method fields exactly as for `train`
    fields = TrainSpec(method=ns.method, rank=ns.rank, alpha=ns.alpha, settings=parse_set(ns.set)).method_fields()
    settings = PlanSettings(
        batch_size=ns.batch_size,
        seq_len=ns.seq_len,
        gradient_checkpointing=ns.gradient_checkpointing,
        load_in_4bit=ns.load_in_4bit,
        world_size=ns.world_size,
        zero_stage=ns.zero_stage,
        dtype=None if ns.dtype == "auto" else torch_dtype(ns.dtype),
        device=ns.device,
    )
    if ns.model and ns.model_option and ns.model != ns.model_option:
        raise LowRankError(f"plan got two models ({ns.model} and --model {ns.model_option}); name one")
    named = ns.model or ns.model_option
    model = resolve_model(named, ns.revision).folder if named else default_model_dir()
    plan = plan_memory(model, ns.method, settings, **fields)
    if ns.json:
        print(json.dumps(plan.as_dict(), indent=2))
        return 0
    print(
        f"{plan.method}: {plan.total / 2**30:.2f} GiB per process predicted "
        f"({plan.trainable_params:,} of {plan.total_params:,} parameters trained)"
    )
    for name, value in sorted(plan.terms.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<24} {value / 2**30:8.2f} GiB")
    for note in plan.notes:
        print(f"  note: {note}")
    return 0


def generate_command(ns: argparse.Namespace) -> int:
    """`hf-lowrank generate`: answer one prompt, or chat on stdin."""
    from .generate import DEFAULT_NEW_TOKENS, answer, chat, check_max_new_tokens, load

    if ns.prompt is not None and not ns.prompt.strip():
        raise LowRankError("--prompt is empty; give the text to answer, or leave --prompt out to chat on stdin")
    model, tokenizer = load(ns.source, ns.base, ns.revision)
    if ns.max_new_tokens is not None:
        check_max_new_tokens(model, ns.max_new_tokens)
    if ns.prompt is None:
        chat(model, tokenizer, sys.stdin, ns.max_new_tokens or DEFAULT_NEW_TOKENS)
    else:
        print(
            answer(model, tokenizer, [{"role": "user", "content": ns.prompt}], ns.max_new_tokens or DEFAULT_NEW_TOKENS)
        )
    return 0
