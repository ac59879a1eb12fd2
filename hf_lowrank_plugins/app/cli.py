"""``hf-lowrank``: list methods, train one, compare several, merge an adapter.

Bad input exits with status 2 and one line on stderr (no traceback) and writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import LowRankError, PluginError


def parse_set(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are JSON when they parse (numbers, booleans, lists), else strings.

    A bare comma-separated value becomes a list of strings (``target_modules=q_proj,v_proj``).
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise LowRankError(f"malformed --set {item!r}: expected KEY=VALUE, e.g. --set lora_dropout=0.05")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = [v.strip() for v in raw.split(",")] if "," in raw else raw
        out[key.strip()] = value
    return out


def parse_scoped_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """``METHOD.KEY=VALUE`` pairs of ``compare --set``, grouped by method (values as in :func:`parse_set`)."""
    grouped: dict[str, list[str]] = {}
    for item in items:
        scope, dot, rest = item.partition("=")[0].partition(".")
        if not dot or not scope.strip() or not rest.strip():
            raise LowRankError(f"malformed --set {item!r}: expected METHOD.KEY=VALUE, e.g. --set pissa.svd=fast")
        grouped.setdefault(scope.strip().lower().replace("-", "_"), []).append(item.split(".", 1)[1])
    return {method: parse_set(pairs) for method, pairs in grouped.items()}


def parse_lr(text: str | None) -> tuple[float | None, dict[str, float]]:
    """``--lr`` of compare: ``X`` for every method, ``METHOD=X,...`` per method, or both (``2e-4,full=5e-5``)."""
    default: float | None = None
    per_method: dict[str, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, sep, value = part.rpartition("=")
        try:
            lr = float(value)
        except ValueError:
            raise LowRankError(
                f"malformed --lr {text!r}: expected a number or METHOD=NUMBER pairs, e.g. --lr lora=1e-3,full=5e-5"
            ) from None
        if sep:
            per_method[name.strip().lower().replace("-", "_")] = lr
        else:
            default = lr
    return default, per_method


def _cmd_list(ns: argparse.Namespace) -> int:
    from ..method import describe_fields
    from ..registry import get_registry

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
        print(f"\noptions (--set KEY=VALUE; {info.config_class.__name__}):")
        for f in fields:
            allowed = f" [{f.allowed}]" if f.allowed else ""
            print(f"  {f.name} = {f.default!r} ({f.type}){allowed}")
            if f.help:  # the first sentence; --json has all of it
                first = f.help.split(". ")[0].rstrip(".")
                print(f"      {first[:157] + '...' if len(first) > 160 else first}")
        return 0
    if ns.json:
        print(
            json.dumps(
                {
                    "methods": [m.as_dict() for m in registry.methods.values()],
                    "failed": registry.failed,
                    "conflicts": {k: [i.as_dict() for i in v] for k, v in registry.conflicts.items()},
                    "entry_point_clashes": registry.clashes,
                },
                indent=2,
            )
        )
        return 0
    rows = [(m.name, m.version, m.distribution, m.config_class.__name__, m.summary) for m in registry.methods.values()]
    header = ("method", "version", "distribution", "config", "summary")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    for name, infos in registry.conflicts.items():
        claimers = " and ".join(f"{i.distribution or i.plugin_name} (plugin '{i.plugin_name}')" for i in infos)
        print(
            f"method '{name}' is claimed by {claimers}: it cannot run until one is blocked "
            f"(HF_LOWRANK_BLOCK_PLUGINS={infos[-1].plugin_name})",
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


def _cmd_train(ns: argparse.Namespace) -> int:
    from .train import TrainSpec, run_training

    spec = TrainSpec(
        method=ns.method,
        output_dir=ns.output_dir or f"runs/{ns.method}",
        lr=ns.lr,
        load_in_4bit=ns.load_in_4bit,
        merge=ns.merge,
        save_steps=ns.save_steps,
        resume_from_checkpoint=ns.resume_from_checkpoint,
        overwrite=ns.overwrite,
        settings=parse_set(ns.set),
        **_run_options(ns),
    )
    metrics = run_training(spec)
    print(
        f"{metrics['method']}: eval loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss_after']:.4f} "
        f"after {metrics['steps']} steps ({metrics['train_seconds']:.1f}s, peak {metrics['peak_memory_mb']:.0f} MB, "
        f"{metrics['trainable_params']:,} trainable parameters); wrote {spec.output_dir}/metrics.json"
    )
    return 0


def _cmd_compare(ns: argparse.Namespace) -> int:
    from .compare import CompareSpec, run_comparison
    from .train import TrainSpec

    default_lr, lr_overrides = parse_lr(ns.lr)
    methods = [m.strip() for m in ns.methods.split(",") if m.strip()] if ns.methods else None  # None: all installed
    spec = CompareSpec(
        methods=methods,
        run=TrainSpec(method="", **_run_options(ns)),
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


def _cmd_merge(ns: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..api import load_adapter, read_adapter_config
    from ..export import write_merged
    from ..outputs import OutputSet

    raw = read_adapter_config(ns.adapter_dir)
    base = ns.base or raw.get("base_model_name_or_path")
    if not base or not Path(base).exists():
        raise LowRankError(f"base model not found ({base!r}); pass --base DIR")
    outputs = OutputSet(
        ns.output_dir, command="merge", overwrite=ns.overwrite, inputs={"adapter": ns.adapter_dir, "base model": base}
    )
    outputs.check()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    adapted = load_adapter(model, ns.adapter_dir)
    has_tokenizer = any((Path(base) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(base) if has_tokenizer else None
    with outputs:
        write_merged(adapted.model, outputs.stage, tokenizer=tokenizer, in_place=True)
        outputs.commit(info={"adapter": str(ns.adapter_dir), "base": str(base)})
    print(f"merged {ns.adapter_dir} into {base}: wrote {ns.output_dir}")
    return 0


#: Options shared by `train` and `compare` (TrainSpec field names), added by _add_run_options.
RUN_OPTIONS = (
    "model",
    "dataset",
    "max_steps",
    "rank",
    "alpha",
    "batch_size",
    "seq_len",
    "grad_accum",
    "seed",
    "eval_every",
    "eval_blocks",
    "bf16",
)


def _run_options(ns: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(ns, name) for name in RUN_OPTIONS}


def _add_run_options(p: argparse.ArgumentParser, eval_every: int | None = None) -> None:
    """The model, data and budget options of a training run (see RUN_OPTIONS)."""
    p.add_argument("--model", help="transformers checkpoint directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument(
        "--dataset", help=".txt, .jsonl with a 'text' field, or a saved datasets directory (default: KJV text)"
    )
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--rank", type=int, help="adapter/projection rank (the method's r or rank)")
    p.add_argument("--alpha", type=float, help="LoRA alpha")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=eval_every, help="evaluate every K steps")
    p.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks for evaluation")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier output of hf-lowrank in --output-dir (never anything else)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-lowrank`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="hf-lowrank", description="Low-rank fine-tuning methods for transformers.Trainer"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="installed methods, or one method's options")
    p.add_argument("--method", help="show this method's options with their help and defaults")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("train", help="fine-tune a causal LM with one method")
    p.add_argument("--method", required=True, help="a name from `hf-lowrank list`")
    p.add_argument("--output-dir", help="default: runs/METHOD")
    _add_run_options(p)
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    p.add_argument(
        "--load-in-4bit", action="store_true", help="quantize the frozen base to NF4 (needs hf-lowrank-qlora)"
    )
    p.add_argument("--merge", action="store_true", help="also write OUTPUT/merged, a plain transformers checkpoint")
    p.add_argument("--save-steps", type=int, help="write a checkpoint every N steps")
    p.add_argument("--resume-from-checkpoint", help="checkpoint directory to resume from")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any other field of the method's config"
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "compare",
        help="train several methods on the same model, data, budget and seed; write a comparison",
        description="Each method trains in a fresh process on the same model, data, steps and seed. Writes "
        "OUTPUT/comparison.json, comparison.md, loss_curves.png, cost.png and OUTPUT/<method>/.",
    )
    p.add_argument(
        "--methods",
        help="comma-separated names from `hf-lowrank list` (default: every installed method; "
        "`full` is plain full fine-tuning)",
    )
    p.add_argument("--output-dir", default="runs/compare")
    _add_run_options(p, eval_every=10)
    p.add_argument(
        "--lr",
        help="learning rate: X for all methods, METHOD=X,... per method, or both (2e-4,full=5e-5); "
        "methods not named use the default table (see comparison.md for each reason)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="a config field of one method, e.g. --set pissa.svd=fast --set galore.rank=64",
    )
    p.add_argument(
        "--reference", help="the method ratios are taken against (default: lora when compared, else the first)"
    )
    p.add_argument(
        "--timeout", type=float, help="seconds after which one method's run is stopped and reported as failed"
    )
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("merge", help="merge a saved adapter into its base and write a plain checkpoint")
    p.add_argument("adapter_dir")
    p.add_argument("--base", help="base model directory (default: the adapter's base_model_name_or_path)")
    p.add_argument("--output-dir", required=True)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier output of hf-lowrank in --output-dir (never anything else)",
    )
    p.set_defaults(func=_cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-lowrank`` command."""
    ns = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars; the Trainer's own progress bar stays
    try:
        return ns.func(ns)
    except PluginError as exc:  # a broken plugin, not the user's input
        print(f"hf-lowrank: error: {exc}", file=sys.stderr)
        return 1
    except LowRankError as exc:
        print(f"hf-lowrank: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError) as exc:
        print(f"hf-lowrank: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hf-lowrank: interrupted; completed outputs are intact, partial ones were not written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
