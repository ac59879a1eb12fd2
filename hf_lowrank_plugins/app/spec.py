"""What one training run is: :class:`TrainSpec`, one field per option, each with its help and range.

The command line is generated from these fields (``app/cli.py``), a ``--config`` file uses their
names, ``compare`` shares the ``run`` ones between methods, and every value is checked by the
library's :func:`~hf_lowrank_plugins.method.validate_config` (types and ranges from the metadata),
so the Python API and the CLI refuse the same inputs with the same one-line message.

Field metadata: ``help``; ``scope`` (``"run"``: ``train`` and ``compare``; ``"train"``: ``train``
only; ``"none"``: no flag); ``flag`` (a different option name); and the ranges of
:mod:`hf_lowrank_plugins.method` (``min``, ``max``, ``min_exclusive``, ``finite``, ``choices``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ConfigError
from ..method import validate_config

DTYPES = ("auto", "bfloat16", "float16", "float32")
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow", "trackio", "all")
#: the packages each logging backend needs (any one of them), checked before anything loads
REPORT_TO_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "trackio": ("trackio",),
}


def opt(help: str, scope: str = "run", **meta: Any) -> dict[str, Any]:
    """Field metadata of a :class:`TrainSpec` option."""
    return {"help": help, "scope": scope, **meta}


#: optimizer steps of a run given neither ``--max-steps`` nor ``--epochs``
DEFAULT_MAX_STEPS = 30


@dataclass
class TrainSpec:
    """Inputs of one run; ``None`` model/dataset mean the embedded SmolLM2-135M-Instruct and KJV text."""

    method: str = field(default="", metadata=opt("a method from `hf-lowrank list`", scope="none"))
    model: str | None = field(
        default=None,
        metadata=opt(
            "transformers checkpoint folder or Hub id, e.g. HuggingFaceTB/SmolLM2-135M (default: embedded "
            "SmolLM2-135M-Instruct)"
        ),
    )
    revision: str | None = field(
        default=None, metadata=opt("Hub revision of --model: a branch, tag or commit (default: main)")
    )
    dataset: str | None = field(
        default=None,
        metadata=opt(
            "training data: .txt, .jsonl, .json, .csv, .parquet, a saved datasets folder or a Hub dataset id, "
            "with text, chat messages, prompt/completion or instruction/input/output records; embedded:kjv-text "
            "or embedded:kjv-quotes (chat) need no file (default: embedded:kjv-text)"
        ),
    )
    dataset_config: str | None = field(
        default=None, metadata=opt("configuration (subset) of a Hub --dataset, as datasets.load_dataset names it")
    )
    dataset_split: str | None = field(
        default=None, metadata=opt("split of a Hub --dataset or a saved DatasetDict folder (default: train)")
    )
    eval_dataset: str | None = field(
        default=None,
        metadata=opt(
            "evaluate on this file, folder or Hub id (its first --eval-blocks examples) and train on all of "
            "--dataset (default: hold out the last --eval-blocks of --dataset)"
        ),
    )
    eval_dataset_split: str | None = field(
        default=None, metadata=opt("split of a Hub --eval-dataset or a saved DatasetDict folder (default: train)")
    )
    output_dir: str | None = field(default=None, metadata=opt("output folder (default: runs/METHOD)", scope="train"))
    max_steps: int | None = field(
        default=None, metadata=opt("optimizer steps (default: 30, or the whole data with --epochs)", min=1)
    )
    epochs: float | None = field(
        default=None,
        metadata=opt("passes over the training data, instead of --max-steps", min_exclusive=0, finite=True),
    )
    rank: int | None = field(default=None, metadata=opt("adapter or projection rank (the method's r or rank)", min=1))
    alpha: float | None = field(default=None, metadata=opt("LoRA alpha", min_exclusive=0, finite=True))
    lr: float = field(default=2e-4, metadata=opt("peak learning rate", scope="train", min_exclusive=0, finite=True))
    batch_size: int = field(default=8, metadata=opt("examples per device and step", min=1))
    seq_len: int = field(
        default=128, metadata=opt("tokens per example (text is packed into blocks of this length)", min=2)
    )
    grad_accum: int = field(default=1, metadata=opt("gradient accumulation steps", min=1))
    max_grad_norm: float = field(default=1.0, metadata=opt("gradient clipping norm (0: off)", min=0, finite=True))
    warmup_steps: int = field(default=0, metadata=opt("linear warm-up steps", min=0))
    seed: int = field(default=0, metadata=opt("random seed", min=0, max=2**32 - 1))
    eval_blocks: int = field(default=16, metadata=opt("held-out examples for evaluation", min=1))
    eval_every: int | None = field(default=None, metadata=opt("evaluate every K steps", min=1))
    save_steps: int | None = field(default=None, metadata=opt("write a checkpoint every N steps", scope="train", min=1))
    resume_from_checkpoint: str | None = field(
        default=None, metadata=opt("checkpoint folder to resume from", scope="train")
    )
    load_in_4bit: bool = field(
        default=False,
        metadata=opt("4-bit NF4 base (needs the quantization extra); in compare, for every method", scope="run"),
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto",
        metadata=opt(
            "dtype of the frozen base (adapters train in fp32); for methods that train the weights themselves "
            "(full, galore) the dtype they train in; auto: the checkpoint's own base, fp32 trained weights"
        ),
    )
    bf16: bool = field(default=False, metadata=opt("bf16 mixed precision"))
    gradient_checkpointing: bool = field(default=False, metadata=opt("recompute activations in backward (less memory)"))
    torch_compile: bool = field(
        default=False,
        metadata=opt("compile the model with torch.compile (faster steps after minutes of compiling on a CPU)"),
    )
    loss_on_prompt: bool = field(
        default=False, metadata=opt("instruction data: train on the prompt tokens too (default: the answers only)")
    )
    merge: bool = field(
        default=False, metadata=opt("also write OUTPUT/merged, a plain transformers checkpoint", scope="train")
    )
    merged_dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto", metadata=opt("dtype of merged/ (auto: the base checkpoint's)", scope="train")
    )
    report_to: list[str] = field(
        default_factory=list,
        metadata=opt("logging backends (tensorboard works offline; none: off)", choices_each=REPORT_TO),
    )
    overwrite: bool = field(
        default=False,
        metadata=opt("replace an earlier output of hf-lowrank in the output folder (never anything else)"),
    )
    push_to_hub: bool = field(
        default=False,
        metadata=opt("upload adapter/ (and merged/) to the Hub once the run is complete", scope="train"),
    )
    hub_model_id: str | None = field(
        default=None,
        metadata=opt("Hub repository to push to, NAMESPACE/NAME (default: the output folder's name)", scope="train"),
    )
    hub_private: bool = field(
        default=False,
        metadata=opt("create the Hub repository private (default: the Hub's default for its owner)", scope="train"),
    )
    push_merged: bool = field(
        default=False, metadata=opt("with --push-to-hub and --merge: upload merged/ too", scope="train")
    )
    deepspeed: str | None = field(
        default=None,
        metadata=opt(
            "DeepSpeed config JSON (ZeRO-0/1/2/3) for a run launched with torchrun or deepspeed; batch sizes and "
            'clipping may be "auto" (see docs/distributed.md)',
            scope="train",
        ),
    )
    progress_bar: bool = field(default=True, metadata=opt("the Trainer's progress bar", scope="none"))
    settings: dict[str, Any] = field(default_factory=dict, metadata=opt("method config fields (--set)", scope="none"))

    def __post_init__(self) -> None:
        validate_config(self, flags=True)
        for option, given in (("--hub-model-id", self.hub_model_id is not None), ("--hub-private", self.hub_private)):
            if given and not self.push_to_hub:
                raise ConfigError(f"{option} says how to push; add --push-to-hub (or drop {option})")
        if self.push_merged and not (self.push_to_hub and self.merge):
            raise ConfigError("--push-merged uploads merged/, which needs --push-to-hub and --merge; add them")
        unknown = [b for b in self.report_to if b not in REPORT_TO]
        if unknown:
            raise ConfigError(
                f"--report-to {','.join(unknown)}: not a logging backend; use one of {', '.join(REPORT_TO)}"
            )
        for backend in self.report_to:
            packages = REPORT_TO_PACKAGES.get(backend, ())
            if packages and not any(importlib.util.find_spec(p) for p in packages):
                raise ConfigError(
                    f"--report-to {backend}: the {packages[0]} package is not installed; pip install {packages[0]} "
                    "or leave the backend out"
                )
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError("--max-steps and --epochs both set the length of the run; give one of them")

    @property
    def steps_or_default(self) -> int | None:
        """``max_steps``, 30 when neither it nor ``epochs`` is given, ``None`` when ``epochs`` decides."""
        if self.max_steps is not None:
            return self.max_steps
        return None if self.epochs is not None else DEFAULT_MAX_STEPS

    def method_fields(self) -> dict[str, Any]:
        """Config fields for the method: ``--set`` values plus ``--rank``/``--alpha`` where given."""
        fields = dict(self.settings)
        if self.rank is not None:
            fields["rank"] = self.rank
        if self.alpha is not None:
            fields["alpha"] = int(self.alpha) if float(self.alpha).is_integer() else self.alpha
        return fields

    def resolved_output_dir(self) -> str:
        """``output_dir``, or ``runs/METHOD``."""
        return self.output_dir or f"runs/{self.method}"


def spec_fields(scope: str) -> list[dataclasses.Field]:
    """The :class:`TrainSpec` fields that are options of ``scope`` (``train`` gets the ``run`` ones too)."""
    scopes = {"train": ("run", "train"), "run": ("run",)}[scope]
    return [f for f in dataclasses.fields(TrainSpec) if f.metadata.get("scope") in scopes]
