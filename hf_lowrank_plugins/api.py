"""The few calls a user needs: pick a method, attach it, train with a plain Trainer, export.

    adapted = attach(model, "lora", r=16)
    trainer = Trainer(model=adapted.model, args=args, train_dataset=ds, **adapted.trainer_kwargs())
    trainer.train()
    adapted.export("out", merge=True, tokenizer=tok)

Switching the method is changing ``"lora"``; the other lines stay.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, TaskType
from torch import nn
from transformers import TrainingArguments

from .callback import LowRankCallback
from .errors import ConfigError, IncompatibleError, LowRankError
from .export import default_export, is_quantized
from .optim import build_default_optimizer
from .outputs import OutputSet
from .registry import MethodInfo, Registry, get_registry
from .types import ExportResult, QuantizationSettings

#: Common CLI flags and the config field each maps to, first existing field wins.
COMMON_FIELDS = {"rank": ("r", "rank"), "alpha": ("lora_alpha", "alpha")}


def config_fields(config_class: type[PeftConfig]) -> dict[str, dataclasses.Field]:
    """The settable fields of a method's config class."""
    return {f.name: f for f in dataclasses.fields(config_class) if f.init}


def make_config(method: str | MethodInfo, registry: Registry | None = None, **fields: Any) -> PeftConfig:
    """Build the config of ``method`` from keyword fields, rejecting unknown ones with the valid list.

    ``rank=`` and ``alpha=`` are accepted for any method and mapped to its own field name
    (``r``/``lora_alpha`` for the LoRA family, ``rank`` for GaLore).
    """
    registry = registry or get_registry()
    info = method if isinstance(method, MethodInfo) else registry.get(method)
    valid = config_fields(info.config_class)
    for common, candidates in COMMON_FIELDS.items():
        if common in fields and common not in valid:
            target = next((c for c in candidates if c in valid), None)
            if target is None:
                raise ConfigError(f"method '{info.name}' has no {common} setting")
            fields[target] = fields.pop(common)
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for method '{info.name}' ({info.config_class.__name__}); "
            f"valid options: {', '.join(sorted(valid))}"
        )
    try:
        return info.config_class(**fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid configuration for method '{info.name}': {exc}") from exc


def infer_task_type(model: nn.Module) -> str | None:
    """PEFT task type from the model class name (``...ForCausalLM`` etc.), ``None`` if unknown."""
    name = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", TaskType.CAUSAL_LM),
        ("ForSequenceClassification", TaskType.SEQ_CLS),
        ("ForTokenClassification", TaskType.TOKEN_CLS),
        ("ForQuestionAnswering", TaskType.QUESTION_ANS),
        ("ForConditionalGeneration", TaskType.SEQ_2_SEQ_LM),
    ):
        if name.endswith(suffix):
            return task
    return None


@dataclasses.dataclass
class Adapted:
    """A model with a method attached, plus what the Trainer needs to run that method.

    Attributes:
        model: the model to hand to the Trainer (a ``PeftModel`` for adapter methods).
        config: the method's ``PeftConfig``.
        method: the :class:`MethodInfo` of the method.
        registry: the registry whose plugins serve this run.
        training_args: set by the callback when the Trainer is built.
    """

    model: nn.Module
    config: PeftConfig
    method: MethodInfo
    registry: Registry
    training_args: TrainingArguments | None = None
    _callback: LowRankCallback | None = dataclasses.field(default=None, repr=False)

    @property
    def callback(self) -> LowRankCallback:
        """The ``TrainerCallback`` that drives this method's life cycle (one per run)."""
        if self._callback is None:
            self._callback = LowRankCallback(self)
        return self._callback

    def trainer_kwargs(self) -> dict[str, Any]:
        """``callbacks`` and ``optimizer_cls_and_kwargs`` for ``Trainer(**...)``; the same for every method."""
        return {"callbacks": [self.callback], "optimizer_cls_and_kwargs": (self.optimizer_factory, {})}

    def optimizer_factory(self) -> Any:
        """Factory for ``Trainer(optimizer_cls_and_kwargs=(adapted.optimizer_factory, {}))``.

        The Trainer calls ``factory()(model)`` inside ``create_optimizer``; we build the optimizer
        the Trainer would have built from its arguments and pass it through ``wrap_optimizer``.
        """
        return self._build_optimizer

    def _build_optimizer(self, model: nn.Module, **_: Any) -> torch.optim.Optimizer:
        if self.training_args is None:
            raise LowRankError(
                "the optimizer factory ran before the callback saw the Trainer's arguments; "
                "pass both with Trainer(..., **adapted.trainer_kwargs())"
            )
        optimizer = build_default_optimizer(model, self.training_args)
        wrapped = self.registry.call_method_hook(
            self.method, "wrap_optimizer", model=model, optimizer=optimizer, config=self.config, args=self.training_args
        )
        optimizer = wrapped if wrapped is not None else optimizer
        optimizer._hf_lowrank_factory = True  # lets the callback check the factory was used
        return optimizer

    def write_deliverables(self, directory: str | Path, merge: bool = False, tokenizer: Any = None,
                           final_dir: str | Path | None = None) -> ExportResult:
        """Write the deliverables into ``directory`` via ``post_train_merge``, with no output-folder checks.

        Meant for a stage folder of an :class:`~hf_lowrank_plugins.outputs.OutputSet` that also
        holds other files of the run (the CLI's ``metrics.json``), to be moved to ``final_dir``;
        :meth:`export` is the safe call.
        """
        directory = Path(directory)
        result = self.registry.call_method_hook(
            self.method, "post_train_merge", model=self.model, config=self.config,
            output_dir=directory, merge=merge, tokenizer=tokenizer, final_dir=Path(final_dir or directory),
        )
        return result if result is not None else default_export(self.model, directory, merge, tokenizer, self.registry)

    def export(
        self, output_dir: str | Path, merge: bool = False, tokenizer: Any = None, overwrite: bool = False
    ) -> ExportResult:
        """Write the deliverables (``adapter/``, and ``merged/`` when ``merge``) as one complete set.

        ``output_dir`` must be new, empty, or (with ``overwrite=True``) an earlier output of this
        tool; anything else raises :class:`~hf_lowrank_plugins.outputs.OutputFolderError` and is
        left untouched. The deliverables are staged and moved in together, with a manifest written
        last (see :mod:`~hf_lowrank_plugins.outputs`). Under multi-process training only the main
        process writes; the others return an empty result.
        """
        from accelerate import PartialState

        if not PartialState().is_main_process:
            return ExportResult()
        output_dir = Path(output_dir)
        base = getattr(self.model, "name_or_path", None) or getattr(getattr(self.model, "config", None), "_name_or_path", None)
        inputs = {"base model": base} if base and Path(base).is_dir() else {}
        with OutputSet(output_dir, command="export", inputs=inputs, overwrite=overwrite) as outputs:
            result = self.write_deliverables(outputs.stage, merge=merge, tokenizer=tokenizer, final_dir=output_dir)
            stage = outputs.stage
            outputs.commit(info={"method": self.method.name})
        return result.relocated(stage, output_dir)


def attach(
    model: nn.Module,
    method: str | PeftConfig,
    *,
    load_in_4bit: bool = False,
    quantization: QuantizationSettings | None = None,
    registry: Registry | None = None,
    **fields: Any,
) -> Adapted:
    """Attach ``method`` (a name or a config instance) to ``model`` before the Trainer is built.

    Args:
        model: any transformers model (causal LM, sequence classification, ...).
        method: a method name from ``hf-lowrank list``, or an instance of a method's config class.
        load_in_4bit: quantize the frozen base to 4-bit NF4 first (needs hf-lowrank-qlora).
        quantization: override the quantization settings (default: the QLoRA recipe).
        registry: the plugin registry to use (default: the installed plugins).
        **fields: config fields when ``method`` is a name (``r=16``, ``target_modules=[...]``).

    Returns:
        An :class:`Adapted` with the model to train and the Trainer arguments to use.
    """
    registry = registry or get_registry()
    if isinstance(method, PeftConfig):
        if fields:
            raise ConfigError("pass either a config instance or keyword fields, not both")
        config, info = method, registry.method_for_config(method)
    else:
        info = registry.get(method)
        config = make_config(info, registry=registry, **fields)
    if getattr(config, "task_type", None) is None and infer_task_type(model) is not None:
        config.task_type = infer_task_type(model)
    if isinstance(model, PeftModel):
        raise IncompatibleError(
            "the model already carries a PEFT adapter; attach methods to the base model "
            "(model.unload() or load the base again), or load a saved adapter with load_adapter()"
        )

    wants_4bit = load_in_4bit or info.requires_quantized_base
    if (wants_4bit or is_quantized(model)) and not info.supports_quantized_base:
        raise IncompatibleError(
            f"method '{info.name}' cannot train on a quantized (4-bit) base: it updates the base weights "
            "themselves. Load the model in 16/32-bit, or pick an adapter method such as lora or dora."
        )
    deferred: QuantizationSettings | None = None
    if wants_4bit and not is_quantized(model) and info.quantizes_base_after_init:
        deferred = quantization or QuantizationSettings.from_config(config)
    elif wants_4bit and not is_quantized(model):
        settings = quantization or QuantizationSettings.from_config(config)
        quantized = registry.pm.hook.quantize_base(model=model, settings=settings)
        if quantized is None:
            raise IncompatibleError(
                "a 4-bit base was requested but no installed plugin quantizes models; "
                "install hf-lowrank-qlora (pip install -e plugins/qlora)"
            )
        model = quantized

    adapted_model = registry.call_method_hook(info, "init_adapter", model=model, config=config, quantization=deferred)
    if adapted_model is None:
        raise LowRankError(f"plugin '{info.plugin_name}' declared method '{info.name}' but did not attach it")
    return Adapted(model=adapted_model, config=config, method=info, registry=registry)


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The raw ``adapter_config.json`` of a saved adapter, with a clear error if it is missing."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise LowRankError(f"{adapter_dir} is not a saved adapter: {path.name} not found")
    return json.loads(path.read_text())


def load_config(adapter_dir: str | Path, registry: Registry | None = None) -> PeftConfig:
    """Load a saved adapter's config as our method's class when its plugin is installed.

    Falls back to PEFT's own class (e.g. ``LoraConfig``) for adapters written without our package.
    """
    registry = registry or get_registry()
    raw = read_adapter_config(adapter_dir)
    name = raw.get("hf_lowrank_method")
    if name and name in registry.methods:
        # PeftConfig.from_pretrained maps peft_type LORA back to LoraConfig; build our class directly
        config_class = registry.methods[name].config_class
        valid = config_fields(config_class)
        return config_class(**{k: v for k, v in raw.items() if k in valid})
    return PeftConfig.from_pretrained(str(adapter_dir))


def load_adapter(
    base_model: nn.Module, adapter_dir: str | Path, is_trainable: bool = False, registry: Registry | None = None
) -> Adapted:
    """Load a saved adapter onto ``base_model``; the config comes back as the method's own class."""
    registry = registry or get_registry()
    config = load_config(adapter_dir, registry)
    try:
        info = registry.method_for_config(config)
    except LowRankError:
        info = registry.get("lora")
    model = PeftModel.from_pretrained(base_model, str(adapter_dir), config=config, is_trainable=is_trainable)
    return Adapted(model=model, config=config, method=info, registry=registry)
