"""``hf-lowrank``: list methods, train one, compare several, merge an adapter, talk to a model.

The ``train`` and ``compare`` options are generated from :class:`~.spec.TrainSpec`'s fields (their
help, defaults and ranges); ``--config run.yaml`` holds any of them, and flags on the command line
win. Bad input exits with status 2 and exactly one line on stderr (no traceback) and writes
nothing; a broken plugin or a diverged run exits 1 with one line; an unexpected internal error
prints one line and the hint to rerun with ``--debug`` (or ``HF_LOWRANK_DEBUG=1``) for the traceback.
A normal run prints our own lines, the progress bar and the Trainer's logs; ``-v`` shows every
library's warnings and logs too.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import math
import os
import signal
import sys
import threading
import traceback
import typing
import warnings
from pathlib import Path
from typing import Any, NoReturn

from ..errors import DivergenceError, LowRankError, PluginError
from .push import PushError
from .spec import TrainSpec, spec_fields


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
        if not (math.isfinite(lr) and lr > 0):
            raise LowRankError(f"--lr {value.strip()}: a learning rate must be a positive finite number, e.g. 2e-4")
        if sep:
            per_method[name.strip().lower().replace("-", "_")] = lr
        else:
            default = lr
    return default, per_method


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``hf-lowrank: error: ...; see --help``), exit 2."""

    def error(self, message: str) -> NoReturn:
        """Print the problem and where the help is, on one line, and exit with status 2."""
        raise UsageError(f"{message}; see `{self.prog} --help`")


class UsageError(LowRankError):
    """A command line argparse refused."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (unless the help says it already); examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: {action.default})"


def _value_parser(annotation: Any, name: str) -> Any:
    """The argparse ``type`` of a spec field: ints and floats with a one-line error, else strings."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    base = args[0]
    if base in (int, float):

        def convert(text: str) -> Any:
            try:
                return base(text)
            except ValueError:
                kind = "an integer" if base is int else "a number"
                raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None

        return convert
    return str


def add_spec_options(parser: argparse.ArgumentParser, scope: str, only: tuple[str, ...] | None = None) -> None:
    """Add the :class:`TrainSpec` fields of ``scope`` (or just those named in ``only``) as options
    (help, default, choices and range checks from the field)."""
    hints = typing.get_type_hints(TrainSpec)
    for f in spec_fields(scope):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        annotation = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata["help"]
        if annotation is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
        elif f.name == "report_to":
            parser.add_argument(
                flag,
                type=lambda t: [v.strip() for v in t.split(",") if v.strip()],
                default=[],
                metavar="BACKENDS",
                help=help_text + " (comma-separated)",
            )
        else:
            choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None
            parser.add_argument(
                flag, type=_value_parser(annotation, f.name), default=default, choices=choices, help=help_text
            )


def spec_from(ns: argparse.Namespace, scope: str, **fixed: Any) -> TrainSpec:
    """A :class:`TrainSpec` from parsed options of ``scope`` plus ``fixed`` fields (validated on construction)."""
    values = {f.name: getattr(ns, f.name) for f in spec_fields(scope)}
    return TrainSpec(**{**values, **fixed})


def load_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Option values from a YAML (or JSON) file: ``dest: value`` per option, dashes or underscores."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LowRankError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LowRankError(f"--config {path}: cannot read it ({exc})") from None
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise LowRankError(f"--config {path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(values, dict):
        raise LowRankError(f"--config {path}: expected option: value pairs, got a {type(values).__name__}")
    known = {a.dest: a for a in parser._actions if a.dest not in ("help", "config", "func")}
    out = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in known:
            raise LowRankError(f"--config {path}: unknown option '{key}'; options are {', '.join(sorted(known))}")
        action = known[dest]
        if isinstance(action, argparse._AppendAction):  # `set:` as KEY=VALUE strings, or as a mapping
            if isinstance(value, dict):
                value = [f"{k}={json.dumps(v)}" for k, v in value.items()]
            elif not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
                raise LowRankError(
                    f"--config {path}: '{key}' must be a list of KEY=VALUE strings or a mapping of KEY: VALUE, "
                    f"got {value!r:.60}"
                )
        elif action.type is not None and value is not None and not isinstance(value, list):
            try:
                value = action.type(str(value))  # type: ignore[operator]  # argparse types Action.type as str | Callable
            except argparse.ArgumentTypeError as exc:
                raise LowRankError(f"--config {path}: {exc}") from None
        out[dest] = value
    return out


def _cmd_train(ns: argparse.Namespace) -> int:
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


def _cmd_compare(ns: argparse.Namespace) -> int:
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
    by_name: dict[str, list[dict[str, Any]]] = {}
    for declared in registry.declarations():  # from the plugin index: imports no plugin it remembers
        by_name.setdefault(declared["name"], []).append(declared)
    methods = [claims[0] for claims in by_name.values() if len(claims) == 1]
    conflicts = {name: claims for name, claims in by_name.items() if len(claims) > 1}
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


def _cmd_merge(ns: argparse.Namespace) -> int:
    from ..checkpoints import torch_dtype
    from ..merge import merge_adapter

    dtype = None if ns.merged_dtype == "auto" else torch_dtype(ns.merged_dtype)
    base = merge_adapter(
        ns.adapter_dir, ns.output_dir, ns.base, ns.revision, merged_dtype=dtype, overwrite=ns.overwrite
    )
    print(f"merged {ns.adapter_dir} into {base}: wrote {ns.output_dir}")
    return 0


def _cmd_plan(ns: argparse.Namespace) -> int:
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


def _cmd_generate(ns: argparse.Namespace) -> int:
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


TRAIN_EXAMPLES = """examples:
  hf-lowrank train --method lora --rank 16 --max-steps 40 --lr 1e-3 --merge
  hf-lowrank train --method qlora --model ./my-llama --dataset chats.jsonl --epochs 1 --gradient-checkpointing
  hf-lowrank train --method pissa --set svd=fast --set target_modules=q_proj,v_proj --output-dir runs/p
  hf-lowrank train --config run.yaml --lr 5e-4          (flags on the command line win over the file)
  hf-lowrank list --method lora                          (every --set option of a method, with help)
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="show every library's warnings and logs")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an internal error")


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-lowrank`` argument parser."""
    parser = OneLineParser(prog="hf-lowrank", description="Low-rank fine-tuning methods for transformers.Trainer")
    parser.add_argument("--version", action=_VersionAction, help="print the versions and exit")
    # the `deepspeed` launcher puts --local_rank=N before each process's arguments; the ranks come from the
    # environment it sets as well (LOCAL_RANK, RANK, WORLD_SIZE), so the value itself is not needed
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("list", help="installed methods, or one method's options", formatter_class=HelpFormatter)
    p.add_argument("--method", help="show this method's options with their help and defaults")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _common(p)
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser(
        "train", help="fine-tune a causal LM with one method", formatter_class=HelpFormatter, epilog=TRAIN_EXAMPLES
    )
    # required, but may come from --config: checked in parse_args once the file is read
    p.add_argument("--method", help="a name from `hf-lowrank list` (required: here or in --config)")
    p.add_argument("--config", help="YAML file of option: value pairs (any option below; the command line wins)")
    add_spec_options(p, "train")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a field of the method's config (`hf-lowrank list --method NAME` shows them)",
    )
    _common(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "compare",
        help="train several methods on the same model, data, budget and seed; write a comparison",
        formatter_class=HelpFormatter,
        description="Each method trains in a fresh process on the same model, data, steps and seed. Writes "
        "OUTPUT/comparison.json, comparison.md, loss_curves.png, cost.png and OUTPUT/<method>/.",
    )
    p.add_argument(
        "--methods",
        help="comma-separated names from `hf-lowrank list` (default: every installed method; "
        "`full` is plain full fine-tuning)",
    )
    p.add_argument("--config", help="YAML file of option: value pairs (the command line wins)")
    p.add_argument("--output-dir", default="runs/compare", help="output folder")
    add_spec_options(p, "run")
    p.set_defaults(eval_every=10)
    p.add_argument(
        "--lr",
        help="learning rate: X for all methods, METHOD=X,... per method, or both (2e-4,full=5e-5); "
        "methods not named use the rate their plugin declares (see comparison.md for each reason)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="a config field of one method, e.g. --set pissa.svd=fast --set galore.rank=64",
    )
    p.add_argument("--reference", help="the method ratios are taken against (default: the reference method, lora)")
    p.add_argument(
        "--timeout", type=_positive_float, help="seconds after which one method's run is stopped and reported as failed"
    )
    _common(p)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser(
        "merge", help="merge a saved adapter into its base and write a plain checkpoint", formatter_class=HelpFormatter
    )
    p.add_argument("adapter_dir")
    p.add_argument("--base", help="base model folder or Hub id (default: the adapter's base_model_name_or_path)")
    p.add_argument("--revision", help="Hub revision of the base: a branch, tag or commit (default: the adapter's)")
    p.add_argument("--output-dir", required=True, help="output folder")
    p.add_argument(
        "--merged-dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        default="auto",
        help="dtype of the merged weights (auto: the base checkpoint's)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier output of hf-lowrank in --output-dir (never anything else)",
    )
    _common(p)
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser(
        "plan",
        help="predict a run's peak memory from the model's config, before loading anything",
        formatter_class=HelpFormatter,
        epilog="examples:\n  hf-lowrank plan ./Llama-3.1-70B --method qlora --rank 16 --batch-size 1 --seq-len 2048 "
        "--gradient-checkpointing --device cuda\n  hf-lowrank plan config.json --method galore --set rank=128 --json\n",
    )
    p.add_argument("model", nargs="?", help="a model folder or its config.json (default: the embedded SmolLM2-135M)")
    p.add_argument("--model", dest="model_option", metavar="MODEL", help="the same, named as train names it")
    p.add_argument("--revision", help="Hub revision of a Hub id model: a branch, tag or commit")
    p.add_argument("--method", required=True, help="a name from `hf-lowrank list`")
    # the options a run shares with `train` are train's own (same help, defaults and checks)
    shared = ("rank", "alpha", "load_in_4bit", "dtype", "gradient_checkpointing", "batch_size", "seq_len")
    add_spec_options(p, "train", only=shared)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a field of the method's config")
    p.add_argument("--world-size", type=_positive_int, default=1, help="processes the run is split over")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=0, help="DeepSpeed ZeRO stage")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu: the whole process, libraries included; cuda: the allocator's peak",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _common(p)
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser(
        "generate",
        help="answer a prompt (or chat on stdin) with a trained model",
        formatter_class=HelpFormatter,
        epilog="examples:\n  hf-lowrank generate runs/demo --prompt 'Quote John 3:16 from the King James "
        "Bible.'\n  hf-lowrank generate runs/demo/adapter          (then type; Ctrl-D ends)\n",
    )
    p.add_argument(
        "source",
        nargs="?",
        help="a run folder, an adapter folder or a checkpoint (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--prompt", help="one user message; without it, every line on stdin is a chat turn")
    p.add_argument("--base", help="the base model of an adapter (default: the one its adapter_config.json names)")
    p.add_argument("--revision", help="Hub revision of the model or base: a branch, tag or commit")
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        help="longest answer, in tokens (default: 64, or what the model's positions leave after the prompt)",
    )
    _common(p)
    p.set_defaults(func=_cmd_generate)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config`` file's values become the defaults, so command-line flags win."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    config = getattr(ns, "config", None)
    if config:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[ns.command]
        sub.set_defaults(**load_config_file(config, sub))
        ns = parser.parse_args(argv)
    if ns.command == "train" and not ns.method:
        raise LowRankError("the following arguments are required: --method (on the command line or in --config)")
    return ns


def quiet_third_parties() -> None:
    """Hide other libraries' warnings and info logs (our own lines, the progress bar and the Trainer's
    logs stay); ``-v`` skips this."""
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    for name in ("bitsandbytes", "peft", "accelerate", "torch", "datasets", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)


def version_line() -> str:
    """``hf-lowrank --version``: the core's version and each installed plugin distribution's, read from
    package metadata (no plugin is imported)."""
    from importlib.metadata import PackageNotFoundError, entry_points, version

    try:
        core = version("hf-lowrank-plugins")
    except PackageNotFoundError:  # run from a source tree without installing
        core = "0+unknown"
    plugins = sorted(
        {f"{ep.dist.name} {ep.dist.version}" for ep in entry_points(group="hf_lowrank_plugins") if ep.dist is not None}
    )
    return f"hf-lowrank {core}" + (f" (plugins: {', '.join(plugins)})" if plugins else "")


class _VersionAction(argparse.Action):
    """``--version``, printed unwrapped (argparse's own action wraps the line) and read only when asked."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> NoReturn:
        print(version_line())
        parser.exit()


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, ``kill``, torchrun ending its workers), handled as Ctrl-C is: every
    ``with OutputSet`` and the Trainer unwind as for an interrupt, so outputs stay consistent."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-lowrank`` command."""
    debug = os.environ.get("HF_LOWRANK_DEBUG", "").lower() in ("1", "true", "yes")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        ns = parse_args(argv)
        debug = debug or ns.debug
        if not ns.verbose:
            quiet_third_parties()
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight-loading bars; the Trainer's own progress bar stays
        status = int(ns.func(ns))
        sys.stdout.flush()  # here, not at exit: a reader gone by now is a BrokenPipeError this function handles
        return status
    except SystemExit as exc:  # --help, or a library calling sys.exit
        return int(exc.code or 0) if isinstance(exc.code, int) else 0
    except KeyboardInterrupt as exc:
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        _end_progress_bars()
        print(f"hf-lowrank: {how}; completed outputs are intact, partial ones were not written", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except BrokenPipeError:  # `hf-lowrank list | head -1`: the reader left, as `head` means it to
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit would fail again on the closed pipe
        return 141
    except (PluginError, DivergenceError, PushError) as exc:  # not the input: a broken plugin, a diverged run, ...
        print(f"hf-lowrank: error: {_one_line(exc)}", file=sys.stderr)
        if debug:
            traceback.print_exc()
        return 1
    except LowRankError as exc:
        if os.environ.get("RANK", "0") in ("", "0"):  # every rank of a launch meets bad input alike: rank 0 says it
            print(f"hf-lowrank: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        print(f"hf-lowrank: error: {_one_line(exc)}; check the path and its permissions", file=sys.stderr)
        return 2
    except Exception as exc:
        if debug:
            traceback.print_exc()
        if isinstance(exc, OSError) and exc.errno in _FULL_DISK:
            where = f" writing {exc.filename}" if exc.filename else ""
            print(
                f"hf-lowrank: error: no space left{where} ({exc.strerror}): free space or raise the file-size limit, "
                "then run again; no complete output was replaced",
                file=sys.stderr,
            )
            return 1
        print(
            f"hf-lowrank: internal error: {type(exc).__name__}: {_one_line(exc)[:300]}; rerun with --debug for the "
            "traceback",
            file=sys.stderr,
        )
        return 1


#: A full disk, a file-size limit or a quota: the environment, not the input, and not our bug.
_FULL_DISK = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line, after ending a progress bar that was cut off mid-line."""
    _end_progress_bars()
    return " ".join(str(exc).split())


def _end_progress_bars() -> None:
    """Close the bars an exception cut off, so their line ends before ours (and none redraws after it)."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None and getattr(tqdm.tqdm, "_instances", None):
        for bar in list(tqdm.tqdm._instances):
            bar.close()


if __name__ == "__main__":
    sys.exit(main())
