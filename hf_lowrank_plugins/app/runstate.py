"""What a run records beyond the Trainer's own state: step times, and a record in every checkpoint.

:class:`StepTimer` times optimizer steps; :class:`PhaseMemory` measures each phase's peak; :class:`RunRecorder` makes each checkpoint
self-describing (method, rank, targets, timings) so a resume is checked against the run and
``metrics.json`` of a resumed run describes the whole run (:func:`whole_run_train_loss`).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..errors import LowRankError
from ..memory import reset_peak_resident, status_bytes

#: Written into every checkpoint this runner saves: what the run was, and its timings so far.
RUN_RECORD = "hf_lowrank_run.json"


def peak_memory_mb() -> float:
    """Peak memory of this process: GPU allocator peak on CUDA, else peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class PhaseMemory(TrainerCallback):
    """Peak memory of each phase of a run, per device: ``load``, ``init``, ``train``, ``export``.

    A phase runs from :meth:`begin` to :meth:`end`. The process's resident set high-water mark is
    reset at each begin where the kernel allows it (``/proc/self/clear_refs``); where it does not,
    the figure is the peak so far and ``cpu_peak_is_cumulative`` says so. Each CUDA device's
    allocator peak is reset and read the same way. As a Trainer callback placed after the method's
    own callbacks, ``on_train_begin`` closes ``init`` (which then includes a data-dependent
    initialisation such as LoRA-GA's) and opens ``train``.
    """

    def __init__(self) -> None:
        self.peaks_mb: dict[str, dict[str, float]] = {}
        self.cumulative = False
        self._phase: str | None = None

    def begin(self, phase: str) -> None:
        """Start measuring ``phase`` (closing the one in progress, if any)."""
        if self._phase is not None:
            self.end()
        if not reset_peak_resident():
            self.cumulative = True
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
        self._phase = phase

    def end(self) -> None:
        """Record the phase in progress."""
        if self._phase is None:
            return
        peaks = {"cpu": status_bytes("VmHWM") / 2**20 or peak_memory_mb()}
        for index in range(torch.cuda.device_count()):
            peaks[f"cuda:{index}"] = torch.cuda.max_memory_allocated(index) / 2**20
        self.peaks_mb[self._phase] = peaks
        self._phase = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """``init`` ends when training starts (after the method's own ``on_train_begin``)."""
        self.begin("train")

    def overall_mb(self) -> float:
        """The whole run's peak on the device :func:`peak_memory_mb` reports (resetting a phase's peak
        also resets the process's own high-water mark, so the run's peak is the largest phase's)."""
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
        return max([peak_memory_mb(), *(p.get(device, 0.0) for p in self.peaks_mb.values())])

    def report(self) -> dict[str, Any]:
        """``{"load": {"cpu": MiB, "cuda:0": MiB}, ..., "cpu_peak_is_cumulative": bool}``."""
        return {**self.peaks_mb, "cpu_peak_is_cumulative": self.cumulative}


def count_trainable(model: torch.nn.Module) -> int:
    """Number of parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


#: What ``save_pretrained`` of a tokenizer writes: shipped alike by every method's adapter/ and merged/
TOKENIZER_FILES = frozenset(
    (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
    )
)


def directory_bytes(path: str | os.PathLike[str]) -> int:
    """Total size of the regular files under ``path`` but the tokenizer's: what the artifact costs on disk
    beyond the tokenizer every method ships alike (so methods compare by what they differ in)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.name not in TOKENIZER_FILES)


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

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Start the clock for the startup interval."""
        self._train_begin = time.perf_counter()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Start timing one optimizer step (and close the startup interval on the first one)."""
        self._step_begin = time.perf_counter()
        if self._train_begin is not None:
            self.startup_seconds = self._step_begin - self._train_begin
            self._train_begin = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
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
      agree with, the base model it trains (where ``generate`` finds the tokenizer of a checkpoint that
      holds whole weights), and the timings so far.
    """

    def __init__(
        self,
        identity: dict[str, Any],
        timer: StepTimer,
        init_seconds: dict[str, float],
        base: dict[str, Any],
        eval_loss_before: float | None = None,
    ) -> None:
        self.identity, self.timer, self.init_seconds, self.base = identity, timer, init_seconds, base
        #: the first evaluation of the run (before its first step), carried over a resume by the records
        self.eval_loss_before = eval_loss_before

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Keep the run's first evaluation (``evaluate()`` before ``train()``, or ``eval_on_start``)."""
        metrics = kwargs.get("metrics") or {}
        if self.eval_loss_before is None and "eval_loss" in metrics:
            self.eval_loss_before = float(metrics["eval_loss"])

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Log on every saving step (``DefaultFlowCallback`` has decided ``should_save`` already)."""
        if control.should_save:
            control.should_log = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Write the run record into the checkpoint the Trainer just saved."""
        folder = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        if folder.is_dir() and args.should_save:
            record = {
                **self.identity,
                "base": self.base,
                **self.init_seconds,
                "eval_loss_before": self.eval_loss_before,
                "steps": self.timer._global_steps,
                "step_seconds": self.timer.step_seconds,
            }
            (folder / RUN_RECORD).write_text(json.dumps(record, indent=2))


#: Records before this format compared seven LoRA fields only; theirs are compared on the keys they hold.
RECORD_FORMAT = 2


def run_identity(method: str, config: Any, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed by this run: the method, every field of its
    config (PEFT's bookkeeping aside: a changed dropout is another run too), and ``data``, the options
    that decide which batches come next (dataset, sequence length, batch size, accumulation, seed):
    with others a resumed run would continue on another stream than the one it left."""
    from ..method import peft_internal_fields

    fields = config.to_dict() if hasattr(config, "to_dict") else {}
    settings = {k: _json_value(v) for k, v in fields.items() if k not in peft_internal_fields()}
    return {
        "format": RECORD_FORMAT,
        "method": method,
        "settings": settings,
        **({"data": dict(data)} if data is not None else {}),
    }


def _json_value(value: Any) -> Any:
    """``value`` as it reads back from the record's JSON (sets sorted, enums and other objects as text)."""
    if isinstance(value, (set, frozenset, tuple)):
        value = sorted(value, key=str)
    return json.loads(json.dumps(value, default=str))


def recorded_base(checkpoint: Path) -> tuple[str, str | None] | None:
    """The base model (a folder or Hub id, and its revision) a checkpoint's run trained, if it records one."""
    try:
        base = json.loads((checkpoint / RUN_RECORD).read_text()).get("base")
    except (OSError, ValueError, AttributeError):
        return None
    return (str(base["model"]), base.get("revision")) if isinstance(base, dict) and base.get("model") else None


def check_checkpoint(path: str, identity: dict[str, Any], max_steps: int | None = None) -> dict[str, Any]:
    """The run record of checkpoint ``path``, after checking it is a complete Trainer checkpoint of this run
    that ``max_steps`` goes beyond.

    Raises :class:`LowRankError` naming what differs (method, rank, dropout, data, ...) and the fix.
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
    if not (folder / "optimizer.pt").is_file():
        raise LowRankError(
            f"--resume-from-checkpoint {path} has no optimizer.pt: the run would go on with fresh optimizer "
            "moments, not as it left off; resume from a complete checkpoint-N, or start a new run"
        )
    if max_steps is not None:
        try:
            step = int(json.loads((folder / "trainer_state.json").read_text())["global_step"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LowRankError(f"--resume-from-checkpoint {path}: trainer_state.json is damaged ({exc})") from None
        if max_steps <= step:
            raise LowRankError(
                f"checkpoint {path} is already at step {step}, and --max-steps {max_steps} would train nothing; "
                f"pass --max-steps greater than {step}"
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
    if "data" in record:  # checkpoints of earlier versions recorded no data options
        theirs.update(record["data"])
        ours.update(identity.get("data", {}))
    if record.get("format", 1) < RECORD_FORMAT:
        ours = {k: v for k, v in ours.items() if k in theirs}
    differs = [
        f"{k} {theirs.get(k)!r} there, {ours.get(k)!r} here"
        for k in sorted(set(theirs) | set(ours))
        if _normalised(theirs.get(k)) != _normalised(ours.get(k))
    ]
    if differs:
        raise LowRankError(
            f"checkpoint {path} was written by another run ({'; '.join(differs)}); resume with the same "
            "method, settings and data options, or start a new run without --resume-from-checkpoint"
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
