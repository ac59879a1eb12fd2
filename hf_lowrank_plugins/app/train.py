"""One training run with a plain ``transformers.Trainer``: what ``hf-lowrank train`` executes.

Reads top to bottom: check everything that can be checked without weights, read the data, load
the base, attach, claim the output folder, train, export. Nothing is written before the output
folder is claimed, and the deliverables plus ``metrics.json`` are committed as one set (see
:mod:`hf_lowrank_plugins.outputs`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments, set_seed

from ..api import attach, make_config
from ..checkpoints import check_model_dir, checkpoint_dtype, load_causal_lm, torch_dtype
from ..distributed import gathered_model
from ..errors import LowRankError
from ..outputs import CHECKPOINTS, OutputSet
from ..quantization import load_quantized
from ..registry import Registry, get_registry
from ..sources import ModelSource, load_model_config, load_tokenizer, resolve_model
from ..types import MethodInfo, QuantizationSettings
from .data import DataSource, TrainingData, data_source, load_training_data
from .embedded import default_model_dir, default_text_path
from .launch import Launch, read_deepspeed_config
from .model import check_bf16, position_limit
from .push import hub_repo_id, push_run
from .runstate import (
    PhaseMemory,
    RunRecorder,
    StepTimer,
    check_checkpoint,
    count_trainable,
    directory_bytes,
    run_identity,
    whole_run_train_loss,
)
from .spec import TrainSpec

#: Where ``--report-to tensorboard`` writes, inside the run's output folder.
TENSORBOARD = "tensorboard"


def check_seq_len(seq_len: int, model_dir: Path) -> None:
    """Refuse a ``--seq-len`` beyond a model's learned absolute positions (GPT-2's ``n_positions``), which
    fail deep inside the forward; rotary models extrapolate and are left alone."""
    limit = position_limit(load_model_config(model_dir), learned_only=True)
    if limit is not None and seq_len > limit:
        raise LowRankError(
            f"--seq-len {seq_len} is longer than {model_dir} can read: its position embeddings hold {limit} "
            f"positions; use --seq-len {limit} or less"
        )


def reports_to_tensorboard(spec: TrainSpec) -> bool:
    """Whether the run logs to TensorBoard, into ``tensorboard/`` of its output folder."""
    return "tensorboard" in spec.report_to or "all" in spec.report_to


def training_arguments(
    spec: TrainSpec,
    output_dir: Path,
    steps: int | None,
    deepspeed: dict[str, Any] | None = None,
    world_size: int = 1,
) -> TrainingArguments:
    """The Trainer's arguments for ``spec``; checkpoints go to ``output_dir/checkpoints``.

    ``deepspeed``: the run's checked DeepSpeed config (:func:`.launch.read_deepspeed_config`);
    ``world_size``: the processes of the launch.
    """
    log_every = max(1, min(10, (steps or 50) // 5))
    on_cpu = not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(output_dir / CHECKPOINTS),
        max_steps=steps if steps is not None else -1,
        num_train_epochs=spec.epochs or 1.0,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum,
        learning_rate=spec.lr,
        warmup_steps=spec.warmup_steps,
        max_grad_norm=spec.max_grad_norm,
        logging_steps=log_every,
        eval_strategy="steps" if spec.eval_every else "no",
        eval_steps=spec.eval_every,
        save_strategy="steps" if spec.save_steps else "no",
        save_steps=spec.save_steps or 500,
        seed=spec.seed,
        bf16=spec.bf16,
        gradient_checkpointing=spec.gradient_checkpointing,
        # non-reentrant: frozen embeddings give inputs without grad, which reentrant checkpointing drops
        gradient_checkpointing_kwargs={"use_reentrant": False} if spec.gradient_checkpointing else None,
        torch_compile=spec.torch_compile,
        report_to=[b for b in spec.report_to if b != "none"] or "none",
        dataloader_num_workers=0,
        use_cpu=on_cpu,  # torchrun on CPU then gets a gloo process group
        disable_tqdm=not spec.progress_bar,
        deepspeed=deepspeed,
        # An evaluate() before train() marks the model prepared without wrapping it, so under DDP every rank then
        # trained alone (accelerate's prepare_model(evaluation_mode=True)), and under DeepSpeed train() took the
        # evaluation engine, which has no optimizer; with several processes the first evaluation runs in train().
        eval_on_start=deepspeed is not None or world_size > 1,
        ddp_backend="gloo" if on_cpu and deepspeed is not None else None,  # DeepSpeed's own default is NCCL
    )


def read_data(spec: TrainSpec, tokenizer: Any, world_size: int = 1) -> TrainingData:
    """The training and held-out data of ``spec`` (the embedded KJV text by default); reading stops at what
    ``world_size`` processes use in the run's steps (each takes its own batches)."""
    steps = spec.steps_or_default
    needed = None if steps is None else steps * spec.batch_size * spec.grad_accum * world_size + spec.eval_blocks
    data = load_training_data(
        training_source(spec),
        tokenizer,
        spec.seq_len,
        spec.eval_blocks,
        needed,
        spec.loss_on_prompt,
        eval_source=evaluation_source(spec),
        split=spec.dataset_split,
        eval_split=spec.eval_dataset_split,
    )
    if data.truncated or data.dropped:
        print(
            f"note: {data.truncated} example(s) longer than --seq-len {spec.seq_len} were cut (their ends are not "
            f"learned) and {data.dropped} left with nothing to learn were skipped; a larger --seq-len keeps them",
            file=sys.stderr,
        )
    return data


def training_source(spec: TrainSpec) -> DataSource:
    """Where ``spec`` trains from: its ``--dataset`` (a file, folder or Hub id), else the embedded text."""
    if spec.dataset is None:
        if spec.dataset_config is not None or spec.dataset_split is not None:
            raise LowRankError("--dataset-config and --dataset-split select within --dataset; name the dataset too")
        return default_text_path()
    return data_source(spec.dataset, spec.dataset_config, spec.dataset_split)


def evaluation_source(spec: TrainSpec) -> DataSource | None:
    """Where ``spec`` evaluates from when apart from its training data (``--eval-dataset``)."""
    if spec.eval_dataset is None:
        if spec.eval_dataset_split is not None:
            raise LowRankError("--eval-dataset-split selects within --eval-dataset; name the dataset too")
        return None
    config = spec.dataset_config if spec.eval_dataset == spec.dataset else None  # another split of the same set
    return data_source(spec.eval_dataset, config, spec.eval_dataset_split)


def local_inputs(spec: TrainSpec) -> dict[str, Path | None]:
    """The local data files a run reads (an output folder must not hold them); Hub datasets are not local."""
    sources: dict[str, DataSource | None] = {"dataset": training_source(spec), "eval dataset": evaluation_source(spec)}
    return {what: source if isinstance(source, Path) else None for what, source in sources.items() if source}


def load_base(spec: TrainSpec, model_dir: Path, info: MethodInfo, config: Any) -> torch.nn.Module:
    """The base model, at the checkpoint's dtype for a frozen base (fp32 master weights when the
    method trains the weights themselves), or straight in 4-bit when the method trains on one."""
    wants_4bit = spec.load_in_4bit or info.requires_quantized_base
    if wants_4bit and info.supports_quantized_base and not info.quantizes_base_after_init:
        return load_quantized(model_dir, QuantizationSettings.from_config(config))
    if spec.dtype != "auto":
        dtype = torch_dtype(spec.dtype)
    else:
        dtype = checkpoint_dtype(model_dir) if info.trains_adapter else torch.float32
    return load_causal_lm(model_dir, dtype)


#: Above this, a trained weight is a run gone wrong: trained language models keep |w| in the tens at most.
HUGE_WEIGHT = 1e4


def largest_trained_value(model: torch.nn.Module) -> float:
    """The largest magnitude among the trainable parameters this process holds."""
    values = [p.detach().abs().max().item() for p in model.parameters() if p.requires_grad and p.numel()]
    return max(values, default=0.0)


def deepspeed_config(path: str, spec: TrainSpec, info: MethodInfo, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config at ``path``, checked against the method and this run's batch settings."""
    batch = {
        "train_micro_batch_size_per_gpu": spec.batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "gradient_clipping": spec.max_grad_norm,
        "train_batch_size": spec.batch_size * spec.grad_accum * world_size,
    }
    return read_deepspeed_config(path, info, batch)


def outcome_warnings(eval_before: float, eval_after: float, largest_weight: float, lr: float) -> list[str]:
    """What the user should hear about a run that finished without an error but did not go well."""
    warnings = []
    if eval_after > eval_before or not math.isfinite(eval_after):
        warnings.append(
            f"the eval loss ended worse than it started ({eval_before:.4g} -> {eval_after:.4g}): the run did not "
            "learn; lower --lr, or check the data"
        )
    if largest_weight > HUGE_WEIGHT:
        warnings.append(
            f"trained weights reach |w| = {largest_weight:.3g}, far beyond the scale of any trained model "
            f"(finite, so no divergence was detected): --lr {lr:g} is likely too high"
        )
    return warnings


def histories(
    log_history: list[dict[str, Any]], timer: StepTimer, init_seconds: float
) -> tuple[list[dict[str, Any]], list[dict[str, float]]]:
    """The training losses per logging step and the eval losses per evaluated step (with the seconds
    since the run began: initialisation plus the steps' time), from the Trainer's log history."""
    train_history: list[dict[str, Any]] = [
        {k: entry[k] for k in ("step", "epoch", "loss", "learning_rate", "grad_norm") if k in entry}
        for entry in log_history
        if "loss" in entry
    ]
    eval_history: list[dict[str, float]] = []
    for entry in log_history:
        # One entry per step: the final evaluate() repeats the last periodic evaluation's step.
        if "eval_loss" in entry and (not eval_history or entry["step"] != eval_history[-1]["step"]):
            seconds = init_seconds + timer.elapsed(int(entry["step"]))
            eval_history.append({"step": entry["step"], "eval_loss": entry["eval_loss"], "seconds": seconds})
    return train_history, eval_history


def run_training(spec: TrainSpec, registry: Registry | None = None, callbacks: list | None = None) -> dict[str, Any]:
    """Train ``spec.method``; commit ``metrics.json``, ``adapter/`` and (with ``merge``) ``merged/`` as one set."""
    registry = registry or get_registry()
    launch = Launch.from_env()
    info = registry.get(spec.method)
    config = make_config(info, registry=registry, **spec.method_fields())  # bad options fail before any loading
    if spec.load_in_4bit and not info.supports_quantized_base:
        raise LowRankError(
            f"--load-in-4bit: method '{info.name}' cannot train on a 4-bit base: {info.no_quantized_base}"
        )
    data_inputs = local_inputs(spec)  # a dataset that is neither a path nor an id fails before any loading
    deepspeed = deepspeed_config(spec.deepspeed, spec, info, launch.world_size) if spec.deepspeed else None
    if spec.bf16:
        check_bf16()
    source = resolve_model(spec.model, spec.revision) if spec.model is not None else ModelSource(default_model_dir())
    model_dir = check_model_dir(source.folder)
    check_seq_len(spec.seq_len, model_dir)
    outputs = OutputSet(
        spec.resolved_output_dir(),
        command="train",
        overwrite=spec.overwrite,
        inputs={"base model": model_dir, **data_inputs},
        resume_from=spec.resume_from_checkpoint,
        in_place=[TENSORBOARD] if reports_to_tensorboard(spec) else [],
    )
    launch.join()  # every process of a launch, or one line why they cannot work together
    launch.share(outputs.check)  # before loading anything: a folder we may not write fails in a second
    repo_id = hub_repo_id(spec.hub_model_id, outputs.path) if spec.push_to_hub else None
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = read_data(spec, tokenizer, launch.world_size)

    memory = PhaseMemory()
    memory.begin("load")
    set_seed(spec.seed)
    base = load_base(spec, model_dir, info, config)
    if source.hub_id is not None:  # the adapter names the Hub id as its base (PEFT reads name_or_path), not the cache
        base.config._name_or_path = source.hub_id  # type: ignore[union-attr]  # nn.Module.__getattr__ types a transformers/PEFT attribute as Tensor | Module
        setattr(base, "name_or_path", source.hub_id)  # noqa: B010 - nn.Module's typed __setattr__ refuses a str
    memory.begin("init")
    started = time.perf_counter()
    adapted = attach(base, config, load_in_4bit=spec.load_in_4bit, registry=registry)
    if source.revision is not None:
        adapted.config.revision = source.revision  # PEFT's field for the base's revision
    attach_seconds = time.perf_counter() - started
    data_options = {
        "dataset": str(data.source.resolve() if isinstance(data.source, Path) else data.source),
        # only when given: checkpoints written before the option existed keep resuming
        **({"eval_dataset": str(data.eval_source)} if data.eval_source is not None else {}),
        "seq_len": spec.seq_len,
        "batch_size": spec.batch_size,
        "grad_accum": spec.grad_accum,
        "seed": spec.seed,
        "loss_on_prompt": spec.loss_on_prompt,
    }
    identity = run_identity(adapted.method.name, adapted.config, data_options)
    resume = spec.resume_from_checkpoint
    record = check_checkpoint(resume, identity, spec.steps_or_default) if resume else {}

    # rank 0 owns the set; every rank checkpoints into its work folder
    with launch.claim(outputs) as work, contextlib.ExitStack() as export_scope:
        if reports_to_tensorboard(spec):
            # transformers reads the folder from the environment (else ./runs/...): keep it in this run's set
            os.environ["TENSORBOARD_LOGGING_DIR"] = str(work / TENSORBOARD)
        args = training_arguments(spec, work, spec.steps_or_default, deepspeed, launch.world_size)
        timer = StepTimer()
        timer.restore(record.get("steps", []), record.get("step_seconds", []))
        init_seconds = {
            "attach_seconds": record.get("attach_seconds", attach_seconds),
            "startup_seconds": record.get("startup_seconds", 0.0),
        }
        base_source = {"model": source.hub_id or str(source.folder.resolve()), "revision": source.revision}
        recorder = RunRecorder(identity, timer, init_seconds, base_source, record.get("eval_loss_before"))
        method_kwargs = adapted.trainer_kwargs()
        trainer = Trainer(
            model=adapted.model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.eval,
            data_collator=data.collator,
            # the timer first: its startup interval then covers the method's data-dependent init (see StepTimer)
            # memory after the method's callbacks: its data-dependent init then counts as "init"
            callbacks=[timer, *method_kwargs.pop("callbacks"), memory, recorder, *(callbacks or [])],
            **method_kwargs,
        )
        if not args.eval_on_start:
            evaluated = trainer.evaluate()["eval_loss"]
            if recorder.eval_loss_before is None:  # a resumed run keeps its checkpoint's
                recorder.eval_loss_before = evaluated
        result = trainer.train(resume_from_checkpoint=spec.resume_from_checkpoint)
        eval_before = recorder.eval_loss_before
        assert eval_before is not None  # evaluated above, or by eval_on_start before the first step
        resumed_from = trainer._initial_global_step if spec.resume_from_checkpoint else 0
        if not record:
            init_seconds["startup_seconds"] = timer.startup_seconds
        eval_after = trainer.evaluate()["eval_loss"]
        # ZeRO-3: every rank gathers the partitioned weights (collective) for rank 0 to check and export
        export_scope.enter_context(gathered_model(adapted.model))
        if not launch.is_main:  # rank 0 exports and writes the set
            return {"rank": launch.rank, "world_size": launch.world_size}

        merged_dtype = checkpoint_dtype(model_dir) if spec.merged_dtype == "auto" else torch_dtype(spec.merged_dtype)
        steps = trainer.state.global_step
        training = {
            "model": source.name,
            "dataset": str(data.source),
            "eval_dataset": None if data.eval_source is None else str(data.eval_source),
            "data_kind": data.kind,
            "steps": steps,
            "lr": spec.lr,
            "eval_loss_before": eval_before,
            "eval_loss_after": eval_after,
        }
        memory.begin("export")
        exported = adapted.write_deliverables(
            outputs.stage,
            merge=spec.merge,
            tokenizer=tokenizer,
            final_dir=outputs.path,
            merged_dtype=merged_dtype,
            training=training,
        )
        memory.end()
        init = init_seconds["attach_seconds"] + init_seconds["startup_seconds"]
        run_warnings = outcome_warnings(eval_before, eval_after, largest_trained_value(adapted.model), spec.lr)
        for warning in run_warnings:
            print(f"hf-lowrank: warning: {warning}", file=sys.stderr)
        train_history, eval_history = histories(trainer.state.log_history, timer, init)
        metrics = {
            "method": spec.method,
            "world_size": launch.world_size,
            "model": source.name,
            "dataset": str(data.source),
            "eval_dataset": None if data.eval_source is None else str(data.eval_source),
            "data_kind": data.kind,
            "train_examples": len(data.train),  # type: ignore[arg-type]  # our datasets are sized
            "examples_truncated": data.truncated,
            "examples_dropped": data.dropped,
            "steps": steps,
            "train_loss": whole_run_train_loss(trainer.state.log_history, resumed_from, result.training_loss, steps),
            "resumed_from_step": resumed_from or None,
            "eval_loss_before": eval_before,
            "eval_loss_after": eval_after,
            "eval_history": eval_history,
            "train_history": train_history,
            "warnings": run_warnings,
            "train_seconds": sum(timer.step_seconds),
            "init_seconds": init,
            "attach_seconds": init_seconds["attach_seconds"],
            "step_seconds": timer.step_seconds,
            "median_step_seconds": timer.median(),
            "lr": spec.lr,
            "base_dtype": str(next(p.dtype for p in base.parameters() if p.is_floating_point())).removeprefix("torch."),
            "peak_memory_mb": memory.overall_mb(),
            "peak_memory_by_phase_mb": memory.report(),
            "trainable_params": count_trainable(adapted.model),
            "config": {
                k: v
                for k, v in adapted.config.to_dict().items()
                if isinstance(v, (int, float, str, bool, list, type(None)))
            },
            "outputs": exported.relocated(outputs.stage, outputs.path).paths(),
            "artifact_bytes": {role: directory_bytes(path) for role, path in exported.paths().items()},
        }
        (outputs.stage / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n")
        trainer.state.save_to_json(str(outputs.stage / "trainer_state.json"))  # the whole run's, not a checkpoint's
        outputs.commit(info={"method": spec.method, "steps": steps})
    if repo_id is not None:
        url = push_run(outputs.path, repo_id, private=spec.hub_private, merged=spec.push_merged)
        print(f"{spec.method}: pushed to {url}")
    return metrics
