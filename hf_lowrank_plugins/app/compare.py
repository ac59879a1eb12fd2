"""``hf-lowrank compare``: train several methods on the same model, data, budget and seed, side by side.

Each method trains in a fresh Python process (this module's worker entry point, which runs
:func:`~hf_lowrank_plugins.app.train.run_training`), so its peak memory is its own and a crash cannot
take the other methods down. The parent reads each run's ``metrics.json`` and writes
``comparison.json``, ``comparison.md`` (figures and ratios to the reference method, LoRA by
default), ``loss_curves.png`` and ``cost.png``, each atomically; json and md are rewritten after
every method, so an interrupted comparison keeps the methods that finished.

Methods come from the registry, so every installed plugin (third-party ones included) can be
compared with no change here; ``full`` (built in) is always available as the baseline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..api import make_config
from ..errors import ConfigError, LowRankError
from ..io import write_json_atomic
from ..outputs import OutputSet
from ..registry import Registry, get_registry
from ..sources import resolve_model
from ..types import MethodInfo
from .report import add_ratios, format_lr, format_seconds, machine_description, run_length, write_reports
from .spec import TrainSpec
from .train import local_inputs

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

PROGRESS_PREFIX = "@hf-lowrank-progress "
WORKER_MODULE = "hf_lowrank_plugins.app.compare"


@dataclasses.dataclass
class CompareSpec:
    """A comparison: the methods, and one :class:`TrainSpec` holding the settings they all share.

    ``methods=None`` compares every installed method (see :func:`default_methods`).

    ``run.method``, ``run.output_dir``, ``run.lr`` and ``run.settings`` are ignored: each method
    trains in ``output_dir/<method>`` with its own learning rate and ``settings[method]``.
    ``run.rank``/``run.alpha`` go only to methods that have such a setting (``full`` has none).
    """

    methods: list[str] | None
    run: TrainSpec
    output_dir: str = "runs/compare"
    lr: float | None = None
    lr_overrides: dict[str, float] = dataclasses.field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    reference: str | None = None
    timeout: float | None = None
    overwrite: bool = False


@dataclasses.dataclass
class PlannedRun:
    """One method's run: its training inputs and where its learning rate came from."""

    method: str
    spec: TrainSpec
    lr_source: str
    reference: bool = False


#: When neither the method nor the reference method declares a learning rate.
FALLBACK_LEARNING_RATE = 2e-4


def learning_rate(
    info: MethodInfo, default: float | None, overrides: dict[str, float], reference: MethodInfo | None = None
) -> tuple[float, str]:
    """The learning rate for a method and its source: ``--lr method=X``, then ``--lr X``, then what the
    method's plugin declares, then the reference method's rate."""
    if info.name in overrides:
        return overrides[info.name], f"--lr {info.name}=..."
    if default is not None:
        return default, "--lr"
    if info.default_lr is not None:
        return info.default_lr, f"default: {info.lr_reason or 'declared by its plugin'}"
    if reference is not None and reference.default_lr is not None:
        return reference.default_lr, f"default: its plugin declares none, so the reference method {reference.name}'s"
    return FALLBACK_LEARNING_RATE, "default: neither this method nor the reference declares a rate"


def default_methods(registry: Registry) -> list[str]:
    """Every installed method: the reference first, then the others by name, baselines (``full``) last."""
    methods = registry.methods.values()
    first = [m.name for m in methods if m.reference]
    last = [m.name for m in methods if m.baseline and not m.reference]
    return first + [m.name for m in methods if m.name not in first + last] + last


def plan(spec: CompareSpec, registry: Registry | None = None) -> list[PlannedRun]:
    """Check every input that can be checked without weights and return one run per method.

    Raises :class:`~hf_lowrank_plugins.errors.LowRankError` (unknown method, option for a method
    not compared, unknown config field, missing model or dataset) before anything is written.
    """
    registry = registry or get_registry()
    requested = default_methods(registry) if spec.methods is None else spec.methods
    if not requested:
        raise ConfigError("no methods to compare: pass --methods lora,full (see `hf-lowrank list`)")
    names = list(dict.fromkeys(registry.get(m).name for m in requested))  # normalised, duplicates dropped
    for option, scoped in (("--lr", spec.lr_overrides), ("--set", spec.settings)):
        strays = sorted(set(scoped) - set(names))
        if strays:
            raise ConfigError(
                f"{option} names method(s) not being compared: {', '.join(strays)} (compared: {', '.join(names)})"
            )
    if spec.reference is not None and spec.reference not in names:
        raise ConfigError(f"reference method '{spec.reference}' is not among the compared methods ({', '.join(names)})")
    data_inputs = local_inputs(spec.run)  # a dataset that is neither a path nor a Hub id fails here, once
    model = resolve_model(spec.run.model, spec.run.revision).folder if spec.run.model is not None else None
    if model is not None and not Path(model).exists():
        raise LowRankError(f"model not found: {model}")
    OutputSet(
        spec.output_dir,
        command="compare",
        overwrite=spec.overwrite,
        inputs={"model": model, **data_inputs},
    ).check()
    declared = registry.reference()
    reference = spec.reference or (declared.name if declared is not None and declared.name in names else names[0])
    runs = []
    for name in names:
        info = registry.get(name)
        lr, source = learning_rate(info, spec.lr, spec.lr_overrides, declared)
        run = dataclasses.replace(
            spec.run,
            method=name,
            output_dir=str(Path(spec.output_dir) / name),
            lr=lr,
            merge=False,
            settings=dict(spec.settings.get(name, {})),
            progress_bar=False,
            rank=spec.run.rank if "rank" in info.aliases else None,
            alpha=spec.run.alpha if "alpha" in info.aliases else None,
        )
        make_config(info, registry=registry, **run.method_fields())  # unknown --set fields fail now
        runs.append(PlannedRun(name, run, source, reference=name == reference))
    return runs


def reference_method(spec: CompareSpec, runs: list[PlannedRun]) -> str:
    """The method ratios are taken against: ``--reference``, else the declared reference when compared, else the first."""
    return next(r.method for r in runs if r.reference)


# ---------------------------------------------------------------- worker (one method, fresh process)


class ProgressReporter:
    """A ``TrainerCallback`` printing machine-readable progress lines for the parent to re-format."""

    def __init__(self, every: int | None) -> None:
        #: report every this many steps; ``None``: a tenth of the run, known once training starts (``--epochs``)
        self.every = None if every is None else max(1, every)
        self.started = time.perf_counter()
        self.last_eval_step: int | None = None

    def _emit(self, **event: Any) -> None:
        print(PROGRESS_PREFIX + json.dumps({**event, "elapsed": time.perf_counter() - self.started}), flush=True)

    def callback(self) -> Any:
        """The callback object (built lazily so the parent process never imports transformers for it)."""
        from transformers import TrainerCallback

        reporter = self

        class _Callback(TrainerCallback):
            def on_train_begin(
                self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
            ) -> None:
                if reporter.every is None:
                    reporter.every = max(1, state.max_steps // 10)

            def on_log(
                self,
                args: TrainingArguments,
                state: TrainerState,
                control: TrainerControl,
                logs: dict | None = None,
                **kw: Any,
            ) -> None:
                logs = logs or {}
                every = reporter.every or 1
                if "loss" in logs and (state.global_step % every == 0 or state.global_step == state.max_steps):
                    reporter._emit(event="step", step=state.global_step, max_steps=state.max_steps, loss=logs["loss"])
                # run_training evaluates before training (max_steps still 0) and again after the last step
                if "eval_loss" in logs and state.global_step != reporter.last_eval_step:
                    reporter.last_eval_step = state.global_step
                    reporter._emit(
                        event="eval", step=state.global_step, max_steps=state.max_steps, eval_loss=logs["eval_loss"]
                    )

        return _Callback()


def worker_main(argv: list[str]) -> int:
    """Child process: run one method from a JSON :class:`TrainSpec`; on failure write the error file ``argv[1]``."""
    from transformers.utils import logging as hf_logging

    from .train import run_training

    spec, error_file = TrainSpec(**json.loads(argv[0])), Path(argv[1])
    hf_logging.disable_progress_bar()
    try:
        steps = spec.steps_or_default
        reporter = ProgressReporter(every=None if steps is None else steps // 10)
        run_training(spec, callbacks=[reporter.callback()])
    except BaseException as exc:
        message = str(exc) if isinstance(exc, LowRankError) else f"{type(exc).__name__}: {exc}"
        write_json_atomic(error_file, {"error": message, "traceback": traceback.format_exc()})
        traceback.print_exc()
        return 1
    return 0


# ---------------------------------------------------------------- parent


def _failure_message(error_file: Path, log: Path, returncode: int, timed_out: float | None) -> str:
    """Why a worker failed: its error file, else the last line of its log, else its exit status."""
    if timed_out is not None:
        return f"timed out after {format_seconds(timed_out)} (raise --timeout)"
    if error_file.is_file():
        return json.loads(error_file.read_text())["error"]
    status = f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
    if returncode == -9:
        status += " (out of memory?)"
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    return f"{status}: {lines[-1].strip()}" if lines else status


def run_method(
    run: PlannedRun, label: str, log: Callable[[str], None], timeout: float | None = None, logs_dir: Path | None = None
) -> dict[str, Any]:
    """Train one method in a fresh process and return its metrics, or ``{"error": ...}`` if it failed.

    The worker's log and error file go to ``logs_dir`` (default: beside the method's output folder,
    which the worker claims as a new output set of its own).
    """
    out_dir = Path(run.spec.resolved_output_dir())
    logs_dir = logs_dir or out_dir.parent / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    log_path, error_file = logs_dir / f"{run.method}.log", logs_dir / f"{run.method}.error.json"
    error_file.unlink(missing_ok=True)  # a previous comparison's error must not be read back
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", WORKER_MODULE, json.dumps(dataclasses.asdict(run.spec)), str(error_file)]
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env)
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(PROGRESS_PREFIX):
                    log(f"{label}: {_progress_text(json.loads(line[len(PROGRESS_PREFIX) :]))}")
                else:
                    log_file.write(line)
            returncode = proc.wait()
        except BaseException:  # interrupted: do not leave an orphan training process behind
            proc.kill()
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
    wall = time.perf_counter() - started
    metrics_file = out_dir / "metrics.json"
    if returncode == 0 and metrics_file.is_file():
        return {**json.loads(metrics_file.read_text()), "wall_seconds": wall}
    timed_out = timeout if timeout and wall >= timeout and returncode != 0 else None
    return {"error": _failure_message(error_file, log_path, returncode, timed_out), "wall_seconds": wall}


def _progress_text(event: dict[str, Any]) -> str:
    where = f"step {event['step']}/{event['max_steps']}"
    if event["event"] == "eval" and event["step"] == 0:
        return f"eval loss before training {event['eval_loss']:.4f}"
    if event["event"] == "eval":
        return f"{where}, eval loss {event['eval_loss']:.4f}"
    return f"{where}, loss {event['loss']:.4f} ({format_seconds(event['elapsed'])})"


def method_result(run: PlannedRun, metrics: dict[str, Any]) -> dict[str, Any]:
    """One row of the comparison from a run's ``metrics.json`` (or its error)."""
    row: dict[str, Any] = {
        "method": run.method,
        "lr": run.spec.lr,
        "lr_source": run.lr_source,
        "settings": run.spec.settings,
        "wall_seconds": metrics.get("wall_seconds"),
    }
    if "error" in metrics:
        return {**row, "status": "failed", "error": metrics["error"]}
    artifacts = metrics.get("artifact_bytes", {})
    artifact = "adapter" if "adapter" in artifacts else "merged" if "merged" in artifacts else None
    before = {"step": 0, "seconds": metrics["init_seconds"], "eval_loss": metrics["eval_loss_before"]}
    history = [before] + [entry for entry in metrics["eval_history"] if entry["step"] > 0]
    return {
        **row,
        "status": "ok",
        "trainable_params": metrics["trainable_params"],
        "init_seconds": metrics["init_seconds"],
        "median_step_seconds": metrics["median_step_seconds"],
        "peak_memory_mb": metrics["peak_memory_mb"],
        "eval_loss_before": metrics["eval_loss_before"],
        "eval_loss": metrics["eval_loss_after"],
        "eval_history": history,
        "artifact": artifact,
        "artifact_bytes": artifacts.get(artifact) if artifact else None,
        "train_seconds": metrics["train_seconds"],
        "steps": metrics["steps"],
        "config": metrics.get("config", {}),
    }


def build_comparison(spec: CompareSpec, runs: list[PlannedRun], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``comparison.json`` document: shared settings, machine, and one row per method run so far."""
    reference = reference_method(spec, runs)
    add_ratios(rows, reference)
    shared = {
        k: v
        for k, v in dataclasses.asdict(spec.run).items()
        if k
        not in (
            "method",
            "output_dir",
            "lr",
            "settings",
            "merge",
            "progress_bar",
            "resume_from_checkpoint",
            "save_steps",
        )
    }
    return {
        "reference": reference,
        "shared_settings": shared,
        "methods_planned": [r.method for r in runs],
        "machine": machine_description(),
        "results": rows,
    }


def run_comparison(
    spec: CompareSpec, registry: Registry | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train every method of ``spec`` in its own process and write the comparison files.

    Returns the ``comparison.json`` document. A method that fails is a row with its error; the
    others still run. Bad input raises before anything is written (see :func:`plan`).
    """
    runs = plan(spec, registry)
    out_dir = Path(spec.output_dir)
    outputs = OutputSet(
        out_dir,
        command="compare",
        overwrite=spec.overwrite,
        inputs={
            "model": resolve_model(spec.run.model, spec.run.revision).folder if spec.run.model else None,
            **local_inputs(spec.run),
        },
        in_place=["logs"],
    )
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    written: list[str] = []
    with outputs:
        # outputs.work is the folder itself, or a hidden one while an earlier comparison stays whole until commit
        work = outputs.work
        for i, run in enumerate(runs, 1):
            label = f"[{i}/{len(runs)}] {run.method}"
            run.spec = dataclasses.replace(run.spec, output_dir=str(work / run.method))
            # The comparison folder is ours (claimed above), so a method folder of an earlier comparison
            # in it is replaced; each worker then claims its folder as a new set of its own.
            shutil.rmtree(run.spec.resolved_output_dir(), ignore_errors=True)
            log(
                f"{label}: training (lr {format_lr(run.spec.lr)}, {run_length(dataclasses.asdict(run.spec))}) -> {out_dir / run.method}"
            )
            row = method_result(run, run_method(run, label, log, spec.timeout, logs_dir=work / "logs"))
            rows.append(row)
            written.append(run.method)
            if row["status"] == "ok":
                log(
                    f"{label}: done in {format_seconds(row['wall_seconds'])}: eval loss {row['eval_loss_before']:.4f} -> "
                    f"{row['eval_loss']:.4f}, median step {row['median_step_seconds']:.3f}s, peak {row['peak_memory_mb']:.0f} MB"
                )
            else:
                log(f"{label}: FAILED after {format_seconds(row['wall_seconds'])}: {row['error']}")
            elapsed = time.perf_counter() - started
            failed = sum(r["status"] != "ok" for r in rows)
            left = f", about {format_seconds(elapsed / i * (len(runs) - i))} left" if i < len(runs) else ""
            log(f"overall: {i}/{len(runs)} methods done ({failed} failed) in {format_seconds(elapsed)}{left}")
            comparison = build_comparison(spec, runs, rows)
            write_reports(comparison, work)  # after every method: an interrupted comparison keeps what finished
        try:
            from .plots import write_plots

            plots = write_plots(comparison, work)
            written += [p.name for p in plots]
            log(f"wrote {', '.join(str(out_dir / p.name) for p in plots)}")
        except ImportError:
            comparison["notes"] = [
                "Plots skipped: matplotlib is not installed (pip install 'hf-lowrank-plugins[plots]')."
            ]
            log(
                "plots skipped: matplotlib is not installed (pip install 'hf-lowrank-plugins[plots]'); json and md written"
            )
            write_reports(comparison, work)
        outputs.commit(
            in_place=[*written, "comparison.json", "comparison.md"], info={"methods": [r.method for r in runs]}
        )
    log(f"wrote {out_dir / 'comparison.json'} and {out_dir / 'comparison.md'}")
    return comparison


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
