"""The few calls a user needs: pick a method, attach it, train with a plain Trainer, export.

    adapted = attach(model, "lora", r=16)
    trainer = Trainer(model=adapted.model, args=args, train_dataset=ds, **adapted.trainer_kwargs())
    trainer.train()
    adapted.export("out", merge=True, tokenizer=tok)

Switching the method is changing ``"lora"``; the other lines stay.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, TaskType
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import TrainingArguments

from .callback import LowRankCallback, TrainerHooksGuard, non_finite_parameters
from .cards import write_model_card
from .distributed import gathered_model
from .errors import ConfigError, DivergenceError, IncompatibleError, LowRankError
from .export import default_export
from .memory import trim_heap
from .method import MethodConfig, config_fields, derived_fields, name_config, owned_fields
from .optim import build_default_optimizer
from .outputs import OutputSet
from .quantization import is_quantized, quantize_model
from .registry import Registry, get_registry
from .types import ExportResult, MethodInfo, QuantizationSettings, SavesPretrained

#: Set on a base model by :func:`attach`: (method, trains an adapter); a second attach is refused
#: while the first method's layers are on the model or the first method trains the weights themselves.
ATTACHED_FLAG = "_hf_lowrank_attached"


def check_argument(name: str, value: Any, expected: type | tuple[type, ...], wanted: str) -> None:
    """Raise :class:`ConfigError` naming the argument when ``value`` is not of ``expected`` type: the API's
    callers get the library's error for a wrong argument, not a TypeError from deep inside PEFT."""
    if not isinstance(value, expected):
        raise ConfigError(f"{name} must be {wanted}, got {type(value).__name__} {value!r:.60}")


def make_config(method: str | MethodInfo, registry: Registry | None = None, **fields: Any) -> PeftConfig:
    """Build the config of ``method`` from keyword fields, rejecting unknown ones with the valid list.

    Aliases the method declares (``rank=``/``alpha=`` for the LoRA family, ``rank=`` for GaLore) are
    mapped to its own field names; the same setting given under both names is an error.
    """
    check_argument("method", method, (str, MethodInfo), "a method name from `hf-lowrank list`")
    registry = registry or get_registry()
    info = method if isinstance(method, MethodInfo) else registry.get(method)
    valid = config_fields(info.config_class)
    for missing in [a for a in ("rank", "alpha") if a in fields and a not in valid and a not in info.aliases]:
        raise ConfigError(f"method '{info.name}' has no {missing} setting (its options: {', '.join(sorted(valid))})")
    for alias, target in dict(info.aliases).items():
        if alias in fields and alias != target:
            if target in fields:
                raise ConfigError(
                    f"{alias} and {target} set the same option of method '{info.name}' ({fields[alias]!r} vs "
                    f"{fields[target]!r}); give it once (--{alias} or --set {target}=...)"
                )
            fields[target] = fields.pop(alias)
    owned = sorted(set(fields) & owned_fields())
    if owned:
        raise ConfigError(
            f"{', '.join(owned)} cannot be set: hf-lowrank and PEFT fill {'it' if len(owned) == 1 else 'them'} in "
            f"(the method, PEFT's type and version, the base, inference mode); drop it, or choose the method by name"
        )
    derived = derived_fields(info.config_class)
    given = sorted(set(fields) & set(derived))
    if given:
        raise ConfigError(
            f"{given[0]} of method '{info.name}' is computed from its other options ({derived[given[0]]}); set those"
        )
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        close = {u: difflib.get_close_matches(u, list(valid), n=1) for u in unknown}
        hints = "".join(f" Did you mean '{c[0]}' for '{u}'?" for u, c in close.items() if c)
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for method '{info.name}' ({info.config_class.__name__}).{hints} "
            f"`hf-lowrank list --method {info.name}` shows every option with its help"
        )
    if issubclass(info.config_class, MethodConfig):
        fields["hf_lowrank_method"] = info.name  # before its checks run, so their messages name the method
    try:
        return info.config_class(**fields)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid configuration for method '{info.name}': {' '.join(str(exc).split())}") from exc


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
        training_args: the arguments of the Trainer built (or, once it trains, training) last; set by
            the callback.
    """

    model: nn.Module
    config: PeftConfig
    method: MethodInfo
    registry: Registry
    training_args: TrainingArguments | None = None
    _callback: LowRankCallback | None = dataclasses.field(default=None, repr=False)
    #: refuses a training step before the callback ran, for methods that need their Trainer hooks
    guard: TrainerHooksGuard | None = None

    @property
    def callback(self) -> LowRankCallback:
        """The ``TrainerCallback`` that drives this method's life cycle, paired with
        :meth:`optimizer_factory` (for a Trainer built by hand; :meth:`trainer_kwargs` makes a fresh pair
        per Trainer)."""
        if self._callback is None:
            self._callback = LowRankCallback(self)
        return self._callback

    def trainer_kwargs(self, args: TrainingArguments | None = None) -> dict[str, Any]:
        """What to pass to ``Trainer(...)`` for this method; the same for every method.

        Without ``args``: ``callbacks`` and ``optimizer_cls_and_kwargs``, so the Trainer builds its
        optimizer through the callback's factory when it creates one (the Trainer's own slot).
        With ``args`` (the ``TrainingArguments`` or TRL config the Trainer gets): the optimizer is
        built now and passed as ``optimizers=(optimizer, None)``, which every Trainer subclass
        accepts, also those without ``optimizer_cls_and_kwargs`` (TRL's ``DPOTrainer``); the
        Trainer still builds the scheduler, clips, checkpoints and resumes it.

        Each call makes its own callback, whose factory builds from the arguments of the Trainer that
        callback belongs to: two Trainers on one adapted model each train with their own settings.
        """
        callback = LowRankCallback(self)
        if args is None:
            return {"callbacks": [callback], "optimizer_cls_and_kwargs": (callback.optimizer_factory, {})}
        callback.training_args = self.training_args = args
        return {"callbacks": [callback], "optimizers": (self.build_optimizer(self.model, args), None)}

    def optimizer_factory(self) -> Any:
        """Factory for ``Trainer(callbacks=[adapted.callback], optimizer_cls_and_kwargs=(adapted.optimizer_factory, {}))``.

        The Trainer calls ``factory()(model)`` inside ``create_optimizer``; the optimizer is built from
        the arguments :attr:`callback` saw (:meth:`build_optimizer`).
        """
        return self.callback.optimizer_factory()

    def build_optimizer(self, model: nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
        """The optimizer the Trainer would build from ``args``, passed through the method's ``wrap_optimizer``."""
        optimizer = build_default_optimizer(model, args)
        wrapped = self.registry.call_method_hook(
            self.method, "wrap_optimizer", model=model, optimizer=optimizer, config=self.config, args=args
        )
        optimizer = wrapped if wrapped is not None else optimizer
        optimizer._hf_lowrank_factory = True  # type: ignore[union-attr]  # lets the callback check the factory was used; a marker attribute on the optimizer object
        if self.guard is not None:
            self.guard.mark("wrap_optimizer")  # a loop of one's own trains with this optimizer
        return optimizer

    def begin_training(
        self,
        dataloader: Any,
        optimizer: torch.optim.Optimizer | None = None,
        args: TrainingArguments | None = None,
        *,
        resumed: bool = False,
    ) -> bool:
        """Run the method's start-of-training work (the ``on_train_begin`` hook) by hand.

        The Trainer does this at its ``on_train_begin`` through :attr:`callback`; call it yourself
        in a training loop of your own, before the first step, with the optimizer you train with
        (a step schedule such as SALOR's hangs on it) and ``resumed=True`` after restoring a
        checkpoint (a data-dependent initialisation is then skipped). Returns whether a parameter
        changed.
        """
        if self.guard is not None:
            self.guard.mark("on_train_begin")
        changed = bool(
            self.registry.call_method_hook(
                self.method,
                "on_train_begin",
                model=self.model,
                config=self.config,
                optimizer=optimizer,
                train_dataloader=dataloader,
                args=args or self.training_args,
                resumed=resumed,
            )
        )
        if changed:
            if self.guard is not None:
                self.guard.hang_on(self.model)  # the parameter it hung on may have been re-created
            # the hook writes through ``param.data``, which leaves version counters alone; what is derived
            # from a parameter and kept until its version moves (cached norms of a frozen weight) must
            # see the new values
            torch.autograd.graph.increment_version([p for p in self.model.parameters() if not p.is_inference()])
        return changed

    def write_deliverables(
        self,
        directory: str | Path,
        merge: bool = False,
        tokenizer: SavesPretrained | None = None,
        final_dir: str | Path | None = None,
        merged_dtype: torch.dtype | None = None,
        training: Mapping[str, Any] | None = None,
    ) -> ExportResult:
        """Write the deliverables into ``directory`` via ``post_train_merge``, with no output-folder checks.

        Meant for a stage folder of an :class:`~hf_lowrank_plugins.outputs.OutputSet` that also
        holds other files of the run (the CLI's ``metrics.json``), to be moved to ``final_dir``;
        :meth:`export` is the safe call. ``adapter/`` and ``merged/`` get a model card
        (:mod:`~hf_lowrank_plugins.cards`) describing ``training`` (data, steps, eval losses) when given.
        """
        directory = Path(directory)
        bad = non_finite_parameters(self.model)
        if bad:  # never deliver a diverged model
            raise DivergenceError(
                f"the model holds non-finite weights ({', '.join(bad)}): training diverged; nothing exported"
            )
        result = self.registry.call_method_hook(
            self.method,
            "post_train_merge",
            model=self.model,
            config=self.config,
            output_dir=directory,
            merge=merge,
            tokenizer=tokenizer,
            final_dir=Path(final_dir or directory),
            merged_dtype=merged_dtype,
        )
        if result is None:
            result = default_export(self.model, directory, merge, tokenizer, merged_dtype=merged_dtype)
        if tokenizer is not None and result.adapter_dir is not None:
            # an adapter is a deliverable on its own too (merge=False): generate and serving read its tokenizer
            tokenizer.save_pretrained(str(result.adapter_dir))
        for role, folder in (("adapter", result.adapter_dir), ("merged", result.merged_dir)):
            if folder is not None:
                write_model_card(folder, role, self.method, self.config, training)
        return result

    def export(
        self,
        output_dir: str | Path,
        merge: bool = False,
        tokenizer: SavesPretrained | None = None,
        overwrite: bool = False,
        merged_dtype: torch.dtype | None = None,
        training: Mapping[str, Any] | None = None,
    ) -> ExportResult:
        """Write the deliverables (``adapter/``, and ``merged/`` when ``merge``) as one complete set.

        ``output_dir`` must be new, empty, or (with ``overwrite=True``) an earlier output of this
        tool; anything else raises :class:`~hf_lowrank_plugins.outputs.OutputFolderError` and is
        left untouched. The deliverables are staged and moved in together, with a manifest written
        last (see :mod:`~hf_lowrank_plugins.outputs`). Under multi-process training only the main
        process writes; the others return an empty result. Under DeepSpeed ZeRO-3 every process must
        call it: the partitioned weights are gathered (the whole model on each process, as the
        Trainer's own ZeRO-3 ``save_model`` does) for the main process to write.
        """
        from accelerate import PartialState

        check_argument("output_dir", output_dir, (str, os.PathLike), "a folder path (str or Path)")
        check_argument("merge", merge, bool, "True or False")
        with gathered_model(self.model):
            if not PartialState().is_main_process:
                return ExportResult()
            return self._export_main(output_dir, merge, tokenizer, overwrite, merged_dtype, training)

    def _export_main(
        self,
        output_dir: str | Path,
        merge: bool,
        tokenizer: SavesPretrained | None,
        overwrite: bool,
        merged_dtype: torch.dtype | None,
        training: Mapping[str, Any] | None,
    ) -> ExportResult:
        output_dir = Path(output_dir)
        base = getattr(self.model, "name_or_path", None) or getattr(
            getattr(self.model, "config", None), "_name_or_path", None
        )
        inputs = {"base model": base} if base and Path(base).is_dir() else {}
        with OutputSet(output_dir, command="export", inputs=inputs, overwrite=overwrite) as outputs:
            result = self.write_deliverables(
                outputs.stage,
                merge=merge,
                tokenizer=tokenizer,
                final_dir=output_dir,
                merged_dtype=merged_dtype,
                training=training,
            )
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
        load_in_4bit: quantize the frozen base to 4-bit NF4 first (needs the ``quantization`` extra).
        quantization: override the quantization settings (default: the QLoRA recipe).
        registry: the plugin registry to use (default: the installed plugins).
        **fields: config fields when ``method`` is a name (``r=16``, ``target_modules=[...]``).

    Returns:
        An :class:`Adapted` with the model to train and the Trainer arguments to use.
    """
    check_argument("model", model, nn.Module, "a torch model (e.g. AutoModelForCausalLM.from_pretrained(...))")
    check_argument("method", method, (str, PeftConfig), "a method name from `hf-lowrank list` or a method's config")
    check_argument("load_in_4bit", load_in_4bit, bool, "True or False")
    registry = registry or get_registry()
    if isinstance(method, PeftConfig):
        if fields:
            raise ConfigError("pass either a config instance or keyword fields, not both")
        config, info = method, registry.method_for_config(method)
        name_config(config, info.name)
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
    earlier = getattr(model, ATTACHED_FLAG, None)
    carries_adapter = any(isinstance(m, BaseTunerLayer) for m in model.modules())
    if earlier is not None and (carries_adapter or not earlier[1]):
        # PEFT injects its layers into the base object in place, and full-weight methods train it
        # directly: a second attach would train on top of (or together with) the first method
        raise IncompatibleError(
            f"method '{earlier[0]}' is already attached to this model object, so method '{info.name}' would train "
            "on top of it; load the base model again and attach one method to it"
        )

    wants_4bit = load_in_4bit or info.requires_quantized_base
    if (wants_4bit or is_quantized(model)) and not info.supports_quantized_base:
        raise IncompatibleError(
            f"method '{info.name}' cannot train on a quantized (4-bit) base: {info.no_quantized_base}"
        )
    deferred: QuantizationSettings | None = None
    if wants_4bit and not is_quantized(model):
        settings = quantization or QuantizationSettings.from_config(config)
        if info.quantizes_base_after_init:
            deferred = settings  # the method sees full precision first and quantizes its own base
        else:
            model = quantize_model(model, settings)

    adapted_model = registry.call_method_hook(info, "init_adapter", model=model, config=config, quantization=deferred)
    if adapted_model is None:
        raise LowRankError(f"plugin '{info.plugin_name}' declared method '{info.name}' but did not attach it")
    trim_heap()  # what a method's attach built and freed (DoRA's dense norms, SVDs) need not stay resident
    setattr(model, ATTACHED_FLAG, (info.name, info.trains_adapter))
    adapted = Adapted(model=adapted_model, config=config, method=info, registry=registry)
    if info.needs_trainer_hooks:
        adapted.guard = TrainerHooksGuard(info.name, sorted(info.trainer_hooks))
        adapted.guard.hang_on(adapted_model)
    return adapted
