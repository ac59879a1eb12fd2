"""One ``hf-lowrank train`` across the processes a launcher started (``torchrun``, ``accelerate launch``).

Every process loads, trains and evaluates (the Trainer shards the batches over them); only rank 0
claims the output folder, exports, writes ``metrics.json`` and commits. The other ranks learn the
folder the run works in (checkpoints) from rank 0, and a refusal on rank 0 (a folder that is not
ours, say) ends every rank with the same status, printed once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import LowRankError
from ..outputs import OutputSet
from ..types import MethodInfo

T = TypeVar("T")


def check_accelerate_cpu_launch(env: Any) -> None:
    """Refuse the one process ``accelerate launch --cpu --num_processes N`` starts where N were asked.

    Without an MPI hostfile accelerate starts CPU runs through its single-process launcher, giving it
    the rendezvous address of the N it was asked for (``MASTER_ADDR``) but no rank: the run would
    train alone, N times slower than asked, and say nothing.
    """
    on_cpu = str(env.get("ACCELERATE_USE_CPU", "")).lower() in ("true", "1", "yes")
    if on_cpu and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        raise LowRankError(
            "accelerate launch --cpu started one process where --num_processes asked for several (accelerate runs "
            "CPU processes only through mpirun, --mpirun_hostfile); launch with torchrun --nproc_per_node N "
            "$(which hf-lowrank) train ..., or drop --num_processes"
        )


#: DeepSpeed config keys the Trainer fills in from its own arguments ("auto"): key -> the options that set it
_TRAINER_FILLED = {
    "train_micro_batch_size_per_gpu": "--batch-size",
    "gradient_accumulation_steps": "--grad-accum",
    "gradient_clipping": "--max-grad-norm",
    "train_batch_size": "--batch-size x --grad-accum x processes",
}


def read_deepspeed_config(path: str, info: MethodInfo, trainer_values: dict[str, float]) -> dict[str, Any]:
    """The DeepSpeed config at ``path``, refused in one line where the run could not use it as written.

    Refused: a file that is not a JSON object, a ZeRO stage the method declared it cannot train
    under, an ``optimizer`` section for a method that replaces the optimizer (DeepSpeed would build
    its own and the method's update would silently not run), and a batch size, accumulation or
    clipping value that disagrees with the run's (``trainer_values``; transformers would stop at
    the Trainer's construction with a paragraph; ``"auto"`` takes the run's).
    """
    import importlib.util
    import json

    from ..distributed import check_zero_stage

    if importlib.util.find_spec("deepspeed") is None:
        raise LowRankError(
            f"--deepspeed {path}: DeepSpeed is not installed; DS_BUILD_OPS=0 pip install 'hf-lowrank-plugins[deepspeed]'"
        )
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LowRankError(f"--deepspeed {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LowRankError(f"--deepspeed {path}: cannot read it ({exc})") from None
    except ValueError as exc:
        raise LowRankError(f"--deepspeed {path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise LowRankError(f"--deepspeed {path}: expected a JSON object of DeepSpeed settings")
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage <= 3:
        raise LowRankError(f"--deepspeed {path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    check_zero_stage(info, stage)
    if info.wraps_optimizer and "optimizer" in config:
        raise LowRankError(
            f"--deepspeed {path}: its optimizer section would replace method '{info.name}''s own optimizer; remove it "
            "(the Trainer hands the method's optimizer to DeepSpeed)"
        )
    for key, option in _TRAINER_FILLED.items():
        given = config.get(key, "auto")
        if given != "auto" and given != trainer_values[key]:
            raise LowRankError(
                f"--deepspeed {path}: {key} is {given!r} but this run's is {trainer_values[key]:g} ({option}); "
                'set it to "auto" or to the same value'
            )
    return config


class FollowerExit(LowRankError):
    """A refusal rank 0 reported for the whole run: the other ranks exit with its status, silently."""


@dataclass(frozen=True)
class Launch:
    """This process's place in the run: its rank among ``world_size`` processes (1: not launched)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Launch:
        """The rank and world size a launcher sets (``RANK``, ``WORLD_SIZE``), or a single process."""
        check_accelerate_cpu_launch(os.environ)
        try:
            return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
        except ValueError:
            raise LowRankError(
                f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} are not whole "
                "numbers; launch with torchrun or accelerate launch, which set them"
            ) from None

    @property
    def is_main(self) -> bool:
        """Whether this process owns the output set."""
        return self.rank == 0

    def join(self) -> None:
        """Form the process group the Trainer will use (gloo on CPUs), or say in one line why it cannot."""
        if self.world_size == 1:
            return
        import torch
        from accelerate import PartialState

        try:
            PartialState(cpu=not torch.cuda.is_available())
        except Exception as exc:
            raise LowRankError(
                f"this process is one of {self.world_size} (WORLD_SIZE={self.world_size}) but cannot join the others "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); start every process with "
                f"torchrun --nproc_per_node {self.world_size} $(which hf-lowrank) train ..., or accelerate launch"
            ) from None

    def share(self, produce: Callable[[], T]) -> T:
        """``produce()``'s result, computed on rank 0 and received by every rank (its refusal too)."""
        if self.world_size == 1:
            return produce()
        import torch.distributed as dist

        payload: list[Any] = [None]
        if self.is_main:
            try:
                payload = [("value", produce())]
            except LowRankError as exc:
                payload = [("refused", str(exc))]
                dist.broadcast_object_list(payload, src=0)
                raise
        dist.broadcast_object_list(payload, src=0)
        kind, value = payload[0]
        if kind == "refused":
            raise FollowerExit(value)
        return value

    @contextmanager
    def claim(self, outputs: OutputSet) -> Iterator[Path]:
        """Rank 0 claims ``outputs`` (as ``with outputs:`` does); every rank gets the folder the run works in."""
        work = self.share(lambda: outputs.open().work)
        try:
            yield work
        finally:
            if self.is_main:
                outputs.abort()  # a no-op once committed; otherwise the set was never completed
