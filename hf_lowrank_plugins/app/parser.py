"""The ``hf-lowrank`` command line: its parser, ``--config`` files, ``--set`` and ``--lr`` values.

The ``train`` and ``compare`` options are generated from :class:`~.spec.TrainSpec`'s fields (their
help, defaults and ranges); ``--config run.yaml`` holds any of them, and flags on the command line
win. Imports no torch and no plugin.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any, NoReturn

from ..errors import LowRankError
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
