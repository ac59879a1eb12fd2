"""The contract of a method, as functions: train a tiny model through the Trainer, export, compare.

Every check compares numbers with a stated tolerance:

* identity at init: the adapted model's output equals the base's right after ``attach``;
* merged equals adapted: ``merged/`` loaded by plain transformers reproduces the trained model;
* round trip: the exported adapter loaded with :func:`~hf_lowrank_plugins.load_adapter` onto the
  base it names reproduces the trained model;
* plain PEFT: the same adapter loaded by ``peft.PeftModel.from_pretrained`` in a process that never
  imports this package reproduces it too, with no warning;
* saved tensors: the adapter's tensors laid on the original base **without** re-running any
  initialisation (as a streamed merge or a serving engine reads them) reproduce it: PEFT re-runs
  a base-rewriting init (OLoRA, PiSSA, ...) when it loads, so the two checks above cannot see an
  adapter that is only right on a rewritten base;
* resume: a run resumed from a checkpoint logs the uninterrupted run's losses;
* the optimizer state of every checkpoint loads with ``torch.load(weights_only=True)``;
* compiles: ``torch.compile`` finds no graph break in a training forward that the base model's own
  forward does not have (each break splits the graph and costs speed: DoRA's per-layer breaks once
  made it slower compiled than eager).
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..api import Adapted, attach
from ..targets import task_heads
from ..types import ExportResult, QuantizationSettings
from .models import ModelCase, output

#: Tolerances of the contract (relative to the largest output magnitude, see :func:`.models.rel_err`).
IDENTITY_TOL = 1e-5
MERGE_TOL = 1e-4
PLAIN_PEFT_TOL = 1e-4
RESUME_TOL = 1e-5

STEPS, SAVE_AT = 4, 2


@dataclass
class TrainedRun:
    """One method trained on one model case: what every check of the contract reads."""

    case: ModelCase
    method: str
    settings: dict[str, Any]
    load_in_4bit: bool
    base_dir: Path
    work_dir: Path
    adapted: Adapted
    losses: list[float]
    trained_output: torch.Tensor
    exported: ExportResult
    batch: dict[str, torch.Tensor] = field(default_factory=dict)
    device: str = "cpu"
    learning_rate: float = 5e-3  #: the run's peak rate (the contract's default; a method class may set its own)

    @property
    def checkpoint(self) -> Path:
        """The checkpoint saved halfway through the run."""
        return self.work_dir / "run" / f"checkpoint-{SAVE_AT}"


def load_base(case: ModelCase, base_dir: Path, device: str = "cpu") -> torch.nn.Module:
    """The saved base on ``device``, loaded the way users load a checkpoint (so it knows its ``name_or_path``)."""
    import transformers

    return getattr(transformers, case.auto_class).from_pretrained(base_dir, dtype=torch.float32).to(device).eval()


def training_arguments(output_dir: Path, device: str = "cpu", **overrides: Any) -> Any:
    """The contract's ``TrainingArguments``: 4 steps of 4 examples, a checkpoint at step 2, cosine schedule,
    on ``device`` (``cpu``, or ``cuda``: the Trainer's own placement)."""
    from transformers import TrainingArguments

    kw: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        lr_scheduler_type="cosine",
        weight_decay=0.01,
        logging_steps=1,
        save_strategy="steps",
        save_steps=SAVE_AT,
        report_to=[],
        use_cpu=device == "cpu",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def _train(
    case: ModelCase,
    base_dir: Path,
    method: str,
    settings: dict[str, Any],
    load_in_4bit: bool,
    out: Path,
    resume: Path | None = None,
    device: str = "cpu",
    learning_rate: float = 5e-3,
) -> tuple[Adapted, list[float]]:
    from transformers import Trainer

    adapted = attach(load_base(case, base_dir, device), method, load_in_4bit=load_in_4bit, **settings)
    trainer = Trainer(
        model=adapted.model,
        args=training_arguments(out, device, learning_rate=learning_rate),
        train_dataset=case.dataset(),
        **adapted.trainer_kwargs(),
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    adapted.model.eval()
    return adapted, losses


def train_run(
    case: ModelCase,
    method: str,
    settings: dict[str, Any],
    work_dir: Path,
    load_in_4bit: bool = False,
    device: str = "cpu",
    learning_rate: float = 5e-3,
) -> TrainedRun:
    """Save the case's base, attach ``method`` on ``device``, train 4 steps with a checkpoint at 2, export
    with ``merge=True``."""
    base_dir = work_dir / "base"
    case.build().save_pretrained(base_dir)  # type: ignore[operator]  # nn.Module.__getattr__ types a transformers/PEFT attribute as Tensor | Module
    adapted, losses = _train(
        case, base_dir, method, settings, load_in_4bit, work_dir / "run", device=device, learning_rate=learning_rate
    )
    batch = case.batch()
    trained = output(adapted.model, batch)
    exported = adapted.export(work_dir / "export", merge=True)
    return TrainedRun(
        case,
        method,
        settings,
        load_in_4bit,
        base_dir,
        work_dir,
        adapted,
        losses,
        trained,
        exported,
        batch,
        device,
        learning_rate,
    )


def resumed_losses(run: TrainedRun) -> list[float]:
    """The losses of a fresh attach resumed from the run's halfway checkpoint (the whole log history)."""
    _, losses = _train(
        run.case,
        run.base_dir,
        run.method,
        run.settings,
        run.load_in_4bit,
        run.work_dir / "resumed",
        resume=run.checkpoint,
        device=run.device,
        learning_rate=run.learning_rate,
    )
    return losses


def identity_error(
    case: ModelCase, method: str, settings: dict[str, Any], load_in_4bit: bool = False, device: str = "cpu"
) -> float:
    """Relative output difference between the base and the just-attached model, both on ``device``.

    With a 4-bit base the reference is the quantized base itself (adapters disabled): quantization is
    not the method's doing.
    """
    base = case.build().to(device)
    batch = case.batch()
    reference = output(base, batch)
    adapted = attach(base, method, load_in_4bit=load_in_4bit, **settings)
    if adapted.method.requires_quantized_base or load_in_4bit:
        with adapted.model.disable_adapter():  # type: ignore[operator]  # nn.Module.__getattr__ types a transformers/PEFT attribute as Tensor | Module
            reference = output(adapted.model, batch)
    from .models import rel_err

    return rel_err(output(adapted.model, batch), reference)


_BASE_GRAPH_BREAKS: dict[tuple[str, str], list[str]] = {}


def graph_breaks(
    case: ModelCase, method: str, settings: dict[str, Any], load_in_4bit: bool = False, device: str = "cpu"
) -> tuple[list[str], list[str]]:
    """Why dynamo breaks the graph of a training-mode forward of ``case``'s base model, and of the same
    model with ``method`` attached: one reason per break (``torch._dynamo.explain`` traces the
    forward; nothing is compiled)."""
    import torch._dynamo

    def reasons(model: torch.nn.Module) -> list[str]:
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model.train())(**{k: v.to(device) for k, v in case.batch().items()})
        return [str(reason.reason).splitlines()[0] for reason in explained.break_reasons]

    key = (case.name, device)
    if key not in _BASE_GRAPH_BREAKS:  # the same for every method: traced once per process
        _BASE_GRAPH_BREAKS[key] = reasons(case.build().to(device))
    adapted = attach(case.build().to(device), method, load_in_4bit=load_in_4bit, **settings)
    adapted_reasons = reasons(adapted.model)
    torch._dynamo.reset()
    return _BASE_GRAPH_BREAKS[key], adapted_reasons


def merged_output(run: TrainedRun) -> torch.Tensor:
    """Output of ``merged/`` loaded by plain transformers."""
    assert run.exported.merged_dir is not None, "export(merge=True) wrote no merged/"
    return output(load_base(run.case, run.exported.merged_dir, run.device), run.batch)


def adapter_base_dir(adapter_dir: Path) -> Path:
    """The base an exported adapter names (``base_model_name_or_path``), which must exist."""
    named = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    assert named and Path(named).is_dir(), f"the adapter names no existing base: {named!r}"
    return Path(named)


def reloaded_output(run: TrainedRun) -> torch.Tensor:
    """Output of the exported adapter loaded with :func:`~hf_lowrank_plugins.load_adapter` onto the base it names."""
    from ..loading import load_adapter

    assert run.exported.adapter_dir is not None
    base = load_base(run.case, adapter_base_dir(run.exported.adapter_dir), run.device)
    if run.load_in_4bit or run.adapted.method.requires_quantized_base:
        from ..quantization import quantize_model

        base = quantize_model(base, QuantizationSettings.from_config(run.adapted.config))
    return output(load_adapter(base, run.exported.adapter_dir).model.eval(), run.batch)


def with_saved_tensors(base: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """``base`` with the adapter's saved tensors laid on PEFT's layers as they are: the adapter's config
    with its initialisation replaced by PEFT's no-op one, so no SVD, rewrite or data pass runs."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(adapter_dir))
    for init_field in ("init_lora_weights", "init_weights"):  # whatever the adapter names, run none of it
        if hasattr(config, init_field):
            setattr(config, init_field, True)
    model = get_peft_model(base, config)
    loaded: Any = set_peft_model_state_dict(model, load_file(adapter_dir / "adapter_model.safetensors"))
    assert not loaded.unexpected_keys, f"saved tensors the adapter's layers do not have: {loaded.unexpected_keys}"
    return model.eval()


def saved_tensors_output(run: TrainedRun) -> torch.Tensor:
    """Output of :func:`with_saved_tensors` on the base the exported adapter names."""
    assert run.exported.adapter_dir is not None
    base = load_base(run.case, adapter_base_dir(run.exported.adapter_dir), run.device)
    if run.load_in_4bit or run.adapted.method.requires_quantized_base:
        from ..quantization import quantize_model

        base = quantize_model(base, QuantizationSettings.from_config(run.adapted.config))
    return output(with_saved_tensors(base, run.exported.adapter_dir), run.batch)


def within(what: str, error: float, tolerance: float) -> str:
    """The failure message of a numeric check: what was compared, the measured error and the tolerance."""
    return f"{what}: relative error {error:.3e} > tolerance {tolerance:.0e}"


#: A fresh interpreter that never imports this package answers load requests one JSON line at a time:
#: starting Python with torch, transformers and PEFT costs seconds, so one process serves a whole session.
PLAIN_PEFT_SERVER = r"""
import json, sys, warnings
import torch, transformers
from peft import PeftModel

for line in sys.stdin:
    request = json.loads(line)
    try:
        kwargs = {"dtype": torch.float32}
        if request["four_bit"]:  # the heads stay full precision, as transformers documents for classifiers
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=request["quant_type"],
                bnb_4bit_use_double_quant=request["double_quant"],
                bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=request["heads"] or None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            base = getattr(transformers, request["cls"]).from_pretrained(request["base"], **kwargs)
            model = PeftModel.from_pretrained(base, request["adapter"]).eval()
        for module in model.modules():  # CPU only: bitsandbytes' bf16 kernel is not the exact dequantized path
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        with torch.no_grad():
            out = model(**torch.load(request["batch"])).logits.float()
        torch.save(out, request["out"])
        ours = sorted(m for m in sys.modules if m.startswith("hf_lowrank"))
        peft_warnings = [str(w.message) for w in caught if "peft" in str(w.filename) or "PEFT" in str(w.message)]
        answer = {"config_class": type(model.peft_config["default"]).__name__, "warnings": peft_warnings,
                  "imported": ours}
    except Exception as exc:
        answer = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(answer), flush=True)
"""


class PlainPeftProcess:
    """The session's plain-PEFT interpreter (:data:`PLAIN_PEFT_SERVER`), started on first use."""

    _proc: subprocess.Popen[str] | None = None

    @classmethod
    def ask(cls, request: dict[str, Any]) -> dict[str, Any]:
        """Send one load request and return the process's answer."""
        if cls._proc is None or cls._proc.poll() is not None:
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
            cls._proc = subprocess.Popen(
                [sys.executable, "-c", PLAIN_PEFT_SERVER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=env,
            )
            atexit.register(cls._proc.kill)
        assert cls._proc.stdin is not None and cls._proc.stdout is not None
        cls._proc.stdin.write(json.dumps(request) + "\n")
        cls._proc.stdin.flush()
        line = cls._proc.stdout.readline()
        assert line, "the plain-PEFT process died"
        return json.loads(line)


def plain_peft_output(run: TrainedRun) -> tuple[torch.Tensor, dict[str, Any]]:
    """Output of the exported adapter on the base it names, loaded by plain PEFT in a process that never
    imports this package, and what that process reported (config class, PEFT's warnings)."""
    assert run.exported.adapter_dir is not None
    batch_path, out_path = run.work_dir / "plain_batch.pt", run.work_dir / "plain_out.pt"
    torch.save(run.batch, batch_path)
    quantization = QuantizationSettings.from_config(run.adapted.config)  # what the run's base was quantized with
    answer = PlainPeftProcess.ask(
        {
            "base": str(adapter_base_dir(run.exported.adapter_dir)),
            "adapter": str(run.exported.adapter_dir),
            "cls": run.case.auto_class,
            "batch": str(batch_path),
            "out": str(out_path),
            "four_bit": bool(run.load_in_4bit or run.adapted.method.requires_quantized_base),
            "quant_type": quantization.quant_type,
            "double_quant": quantization.double_quant,
            "heads": list(task_heads(run.case.build())),
        }
    )
    assert "error" not in answer, answer["error"]
    assert answer["imported"] == [], f"the plain-PEFT process imported {answer['imported']}"
    return torch.load(out_path), answer


def optimizer_state_loads_weights_only(run: TrainedRun) -> None:
    """Load the checkpoint's optimizer state the way the Trainer does on resume: ``weights_only=True``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = torch.load(run.checkpoint / "optimizer.pt", weights_only=True)
    assert "state" in state and "param_groups" in state
