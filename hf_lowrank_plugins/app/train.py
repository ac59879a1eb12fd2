"""One training run with a plain ``transformers.Trainer``: what ``hf-lowrank train`` executes.

Reads top to bottom: check everything that can be checked without weights, load, attach, claim
the output folder, train, export. Nothing is written before the output folder is claimed, and the
deliverables plus ``metrics.json`` are committed as one set (see :mod:`hf_lowrank_plugins.outputs`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments, set_seed

from ..api import attach, make_config
from ..errors import LowRankError
from ..outputs import CHECKPOINTS, OutputSet
from ..registry import Registry, get_registry
from .data import default_model_dir, load_blocks

#: Written into every checkpoint this runner saves: what the run was, and its timings so far.
RUN_RECORD = "hf_lowrank_run.json"


@dataclasses.dataclass
class TrainSpec:
    """Inputs of one run; ``None`` model/dataset mean the embedded SmolLM2-135M and KJV text."""

    method: str
    model: str | None = None
    dataset: str | None = None
    output_dir: str = "runs/latest"
    max_steps: int = 30
    rank: int | None = None
    alpha: float | None = None
    lr: float = 2e-4
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    load_in_4bit: bool = False
    merge: bool = False
    seed: int = 0
    eval_blocks: int = 16
    eval_every: int | None = None
    save_steps: int | None = None
    resume_from_checkpoint: str | None = None
    bf16: bool = False
    warmup_steps: int = 0
    progress_bar: bool = True
    overwrite: bool = False
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def method_fields(self) -> dict[str, Any]:
        """Config fields for the method: ``--set`` values plus ``--rank``/``--alpha`` where given."""
        fields = dict(self.settings)
        if self.rank is not None:
            fields["rank"] = self.rank
        if self.alpha is not None:
            fields["alpha"] = self.alpha
        return fields


def peak_memory_mb() -> float:
    """Peak memory of this process: GPU allocator peak on CUDA, else peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def count_trainable(model: torch.nn.Module) -> int:
    """Number of parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def directory_bytes(path: str | os.PathLike[str]) -> int:
    """Total size of the regular files under ``path`` (what the artifact costs on disk)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


class StepTimer(TrainerCallback):
    """Wall seconds of every optimizer step, and of what happens between train begin and the first step.

    A step is timed from ``on_step_begin`` to ``on_step_end``: forward, backward, clipping and the
    optimizer update of all its micro-batches, but neither evaluation nor checkpointing, which the
    Trainer runs after ``on_step_end``. Put it *before* the method's callback in the Trainer's list:
    ``startup_seconds`` then covers the method's data-dependent initialisation (LoRA-GA's gradient
    estimation runs in that callback's ``on_train_begin``) plus fetching the first batch.
    """

    def __init__(self) -> None:
        self.step_seconds: list[float] = []
        self._global_steps: list[int] = []  # the Trainer's step number of each entry (offset on resume)
        self.startup_seconds = 0.0
        self._train_begin: float | None = None
        self._step_begin = 0.0

    def restore(self, steps: list[int], seconds: list[float]) -> None:
        """Put the steps of the run's earlier part (read from a checkpoint) in front of this part's."""
        self._global_steps = [*steps, *self._global_steps]
        self.step_seconds = [*seconds, *self.step_seconds]

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        """Start the clock for the startup interval."""
        self._train_begin = time.perf_counter()

    def on_step_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        """Start timing one optimizer step (and close the startup interval on the first one)."""
        self._step_begin = time.perf_counter()
        if self._train_begin is not None:
            self.startup_seconds = self._step_begin - self._train_begin
            self._train_begin = None

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        """Record the step's wall time."""
        self.step_seconds.append(time.perf_counter() - self._step_begin)
        self._global_steps.append(state.global_step)

    def median(self, warmup: int = 2) -> float | None:
        """Median step seconds after ``warmup`` steps (all steps when there are no more than that)."""
        measured = self.step_seconds[warmup:] or self.step_seconds
        return statistics.median(measured) if measured else None

    def elapsed(self, global_step: int) -> float:
        """Training seconds this run spent up to and including ``global_step`` (evaluation excluded)."""
        return sum(t for s, t in zip(self._global_steps, self.step_seconds, strict=True) if s <= global_step)


class RunRecorder(TrainerCallback):
    """Makes every checkpoint self-describing and the logged losses sum to the whole run's.

    * On every step that saves, it asks the Trainer to log first, so the log history inside a
      checkpoint covers exactly its steps (a resumed run's ``train_loss`` is then the whole run's).
    * Into every checkpoint it writes :data:`RUN_RECORD`: the method and the settings a resume must
      agree with, and the timings so far.
    """

    def __init__(self, identity: dict[str, Any], timer: StepTimer, init_seconds: dict[str, float]) -> None:
        self.identity, self.timer, self.init_seconds = identity, timer, init_seconds

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        """Log on every saving step (``DefaultFlowCallback`` has decided ``should_save`` already)."""
        if control.should_save:
            control.should_log = True

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the run record into the checkpoint the Trainer just saved."""
        folder = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        if folder.is_dir() and args.should_save:
            record = {
                **self.identity,
                **self.init_seconds,
                "steps": self.timer._global_steps,
                "step_seconds": self.timer.step_seconds,
            }
            (folder / RUN_RECORD).write_text(json.dumps(record, indent=2))


def run_identity(method: str, config: Any) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed by this run: method, rank, alpha, targets."""
    fields = config.to_dict() if hasattr(config, "to_dict") else {}
    keep = ("r", "rank", "lora_alpha", "target_modules", "exclude_modules", "use_rslora", "use_dora")
    identity = {k: fields[k] for k in keep if k in fields}
    if isinstance(identity.get("target_modules"), (set, tuple)):
        identity["target_modules"] = sorted(identity["target_modules"])
    return {"method": method, "settings": identity}


def check_checkpoint(path: str, identity: dict[str, Any]) -> dict[str, Any]:
    """The run record of checkpoint ``path``, after checking it is a Trainer checkpoint of this run.

    Raises :class:`LowRankError` naming what differs (method, rank, targets, ...) and the fix.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise LowRankError(
            f"--resume-from-checkpoint {path}: no such folder; pass a checkpoint-N folder of an earlier run"
        )
    if not (folder / "trainer_state.json").is_file():
        raise LowRankError(
            f"--resume-from-checkpoint {path} is not a Trainer checkpoint (no trainer_state.json); "
            "pass one of OUTPUT/checkpoints/checkpoint-N"
        )
    try:
        record = json.loads((folder / RUN_RECORD).read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise LowRankError(
            f"--resume-from-checkpoint {path}: {RUN_RECORD} is corrupt ({exc}); pick another checkpoint"
        ) from None
    theirs = {"method": record.get("method"), **record.get("settings", {})}
    ours = {"method": identity["method"], **identity["settings"]}
    differs = [
        f"{k} {theirs.get(k)!r} there, {ours.get(k)!r} here"
        for k in sorted(set(theirs) | set(ours))
        if _normalised(theirs.get(k)) != _normalised(ours.get(k))
    ]
    if differs:
        raise LowRankError(
            f"checkpoint {path} was written by another run ({'; '.join(differs)}); resume with the same "
            "method and settings, or start a new run without --resume-from-checkpoint"
        )
    return record


def _normalised(value: Any) -> Any:
    return sorted(value) if isinstance(value, (list, set, tuple)) else value


def whole_run_train_loss(
    log_history: list[dict[str, Any]], resumed_from: int, resumed_loss: float, steps: int
) -> float:
    """Mean training loss over all ``steps``, also after a resume at step ``resumed_from``.

    The Trainer's ``training_loss`` covers only the steps run by this ``train()`` call; the
    checkpoint's log history (restored on resume, and logged at every save by :class:`RunRecorder`)
    holds the mean loss of each logging interval before it.
    """
    if resumed_from <= 0 or steps <= 0:
        return resumed_loss
    earlier, last_step = 0.0, 0
    for entry in log_history:
        if "loss" in entry and entry["step"] <= resumed_from:
            earlier += entry["loss"] * (entry["step"] - last_step)
            last_step = entry["step"]
    return (earlier + resumed_loss * (steps - resumed_from)) / steps


def run_training(spec: TrainSpec, registry: Registry | None = None, callbacks: list | None = None) -> dict[str, Any]:
    """Train ``spec.method``; commit ``metrics.json``, ``adapter/`` and (with ``merge``) ``merged/`` as one set."""
    registry = registry or get_registry()
    make_config(spec.method, registry=registry, **spec.method_fields())  # fail fast on bad options
    if spec.model is not None and not Path(spec.model).exists():
        raise LowRankError(f"model not found: {spec.model}")
    if spec.dataset is not None and not Path(spec.dataset).exists():
        raise LowRankError(f"dataset not found: {spec.dataset}")
    if spec.max_steps < 1 or spec.batch_size < 1 or spec.seq_len < 2:
        raise LowRankError("--max-steps and --batch-size must be >= 1 and --seq-len >= 2")
    model_dir = Path(spec.model) if spec.model is not None else default_model_dir()
    outputs = OutputSet(
        spec.output_dir,
        command="train",
        overwrite=spec.overwrite,
        inputs={"base model": model_dir, "dataset": spec.dataset},
        resume_from=spec.resume_from_checkpoint,
    )
    outputs.check()  # before loading anything: a folder we may not write fails in a second

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    needed = spec.max_steps * spec.batch_size * spec.grad_accum
    train_ds, eval_ds = load_blocks(
        spec.dataset, tokenizer, spec.seq_len, max_blocks=needed + spec.eval_blocks, eval_blocks=spec.eval_blocks
    )
    set_seed(spec.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    started = time.perf_counter()
    adapted = attach(model, spec.method, load_in_4bit=spec.load_in_4bit, registry=registry, **spec.method_fields())
    attach_seconds = time.perf_counter() - started
    identity = run_identity(adapted.method.name, adapted.config)
    record = check_checkpoint(spec.resume_from_checkpoint, identity) if spec.resume_from_checkpoint else {}

    with outputs:
        args = TrainingArguments(
            output_dir=str(outputs.path / CHECKPOINTS),
            max_steps=spec.max_steps,
            per_device_train_batch_size=spec.batch_size,
            per_device_eval_batch_size=spec.batch_size,
            gradient_accumulation_steps=spec.grad_accum,
            learning_rate=spec.lr,
            warmup_steps=spec.warmup_steps,
            logging_steps=max(1, min(10, spec.max_steps // 5)),
            eval_strategy="steps" if spec.eval_every else "no",
            eval_steps=spec.eval_every,
            save_strategy="steps" if spec.save_steps else "no",
            save_steps=spec.save_steps or 500,
            seed=spec.seed,
            bf16=spec.bf16,
            report_to=[],
            dataloader_num_workers=0,
            disable_tqdm=not spec.progress_bar,
        )
        timer = StepTimer()
        timer.restore(record.get("steps", []), record.get("step_seconds", []))
        init_seconds = {
            "attach_seconds": record.get("attach_seconds", attach_seconds),
            "startup_seconds": record.get("startup_seconds", 0.0),
        }
        recorder = RunRecorder(identity, timer, init_seconds)
        method_kwargs = adapted.trainer_kwargs()
        trainer = Trainer(
            model=adapted.model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            # the timer first: its startup interval then covers the method's data-dependent init (see StepTimer)
            callbacks=[timer, *method_kwargs.pop("callbacks"), recorder, *(callbacks or [])],
            **method_kwargs,
        )
        eval_before = trainer.evaluate()["eval_loss"]
        result = trainer.train(resume_from_checkpoint=spec.resume_from_checkpoint)
        resumed_from = trainer._initial_global_step if spec.resume_from_checkpoint else 0
        if not record:
            init_seconds["startup_seconds"] = timer.startup_seconds
        eval_after = trainer.evaluate()["eval_loss"]

        exported = adapted.write_deliverables(
            outputs.stage, merge=spec.merge, tokenizer=tokenizer, final_dir=outputs.path
        )
        init = init_seconds["attach_seconds"] + init_seconds["startup_seconds"]
        eval_history: list[dict[str, float]] = []
        for entry in trainer.state.log_history:
            # One entry per step: the final evaluate() repeats the last periodic evaluation's step.
            if "eval_loss" in entry and (not eval_history or entry["step"] != eval_history[-1]["step"]):
                seconds = init + timer.elapsed(int(entry["step"]))
                eval_history.append({"step": entry["step"], "eval_loss": entry["eval_loss"], "seconds": seconds})
        steps = trainer.state.global_step
        final = exported.relocated(outputs.stage, outputs.path)
        metrics = {
            "method": spec.method,
            "model": str(model_dir),
            "steps": steps,
            "train_loss": whole_run_train_loss(trainer.state.log_history, resumed_from, result.training_loss, steps),
            "resumed_from_step": resumed_from or None,
            "eval_loss_before": eval_before,
            "eval_loss_after": eval_after,
            "eval_history": eval_history,
            "train_seconds": sum(timer.step_seconds),
            "init_seconds": init,
            "attach_seconds": init_seconds["attach_seconds"],
            "step_seconds": timer.step_seconds,
            "median_step_seconds": timer.median(),
            "lr": spec.lr,
            "peak_memory_mb": peak_memory_mb(),
            "trainable_params": count_trainable(adapted.model),
            "config": {
                k: v
                for k, v in adapted.config.to_dict().items()
                if isinstance(v, (int, float, str, bool, list, type(None)))
            },
            "outputs": final.paths(),
            "artifact_bytes": {role: directory_bytes(path) for role, path in exported.paths().items()},
        }
        (outputs.stage / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n")
        outputs.commit(info={"method": spec.method, "steps": steps})
    return metrics
