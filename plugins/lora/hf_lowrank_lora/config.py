"""LoRA's config: PEFT's ``LoraConfig`` with our defaults, checked field by field on construction."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from peft import LoraConfig

from hf_lowrank_plugins import ConfigError, MethodConfig, validate_config

#: Why each ``init_lora_weights`` value PEFT accepts but this method refuses is refused, and the fix.
#: They rewrite the base weights (or need calibration data) at attach; PEFT saves only the adapter and
#: re-runs the rewrite when it loads, so the adapter on the original base (``hf-lowrank merge``,
#: vLLM, any loader that does not repeat the init) would be another model.
_REWRITING_INITS = {
    "pissa": "use --method pissa, which exports a plain LoRA on the original weights",
    "lora_ga": "use --method lora_ga, which exports a plain LoRA on the original weights",
    "olora": "use --method olora, which exports a plain LoRA on the original weights",
    "corda": "CorDA rewrites the base weights from calibration data and is not exported portably yet",
    "eva": "EVA needs calibration data that attach does not take",
    "loftq": "LoftQ rewrites the base weights; for a quantized base use --method qlora",
}


def is_peft_init(value: object) -> bool:
    """True for a value PEFT 0.21's ``init_lora_weights`` accepts (whether or not a method allows it)."""
    names = ("gaussian", "orthogonal", "mica", *_REWRITING_INITS)
    return isinstance(value, bool) or (isinstance(value, str) and value.startswith(names))


#: ``--rank`` / ``--alpha`` (and ``rank=`` / ``alpha=`` in Python) for every LoRA-family method.
LORA_ALIASES = {"rank": "r", "alpha": "lora_alpha"}


def peft_meta(name: str, **extra: Any) -> dict[str, Any]:
    """PEFT's own metadata (help text, variant tags) of a ``LoraConfig`` field a subclass redeclares,
    with ``extra`` keys (``help``, ``min``, ``choices``, ...) added or replaced."""
    return {**next(f.metadata for f in fields(LoraConfig) if f.name == name), **extra}


@dataclass
class LoraMethodConfig(LoraConfig, MethodConfig):
    """``peft.LoraConfig`` with ``target_modules="all-linear"`` by default (works for any model).

    Every field is checked against its type and range when the config is built (``r=4.5``,
    ``lora_dropout="abc"`` or ``lora_dropout=1.5`` raise :class:`~hf_lowrank_plugins.ConfigError`),
    so the Python API and ``--set`` fail alike. All PEFT options apply: ``r``,
    ``lora_alpha``, ``use_rslora``, ``lora_dropout``, ``target_modules`` (names, regex,
    ``"all-linear"``), ``exclude_modules``, ``bias``, ...
    """

    target_modules: list[str] | str | None = field(default="all-linear", metadata=peft_meta("target_modules"))
    # PEFT annotates int, but any positive real works (s = alpha / r); `--alpha 16` arrives as a float
    lora_alpha: int | float = field(default=8, metadata=peft_meta("lora_alpha"))  # type: ignore[assignment]

    #: Ranges of inherited PEFT fields, which carry no such metadata of their own.
    FIELD_LIMITS: ClassVar[dict[str, dict[str, Any]]] = {
        "r": {"min": 1},
        "lora_alpha": {"min_exclusive": 0},
        "lora_dropout": {"min": 0, "max_exclusive": 1},
    }
    #: Fields PEFT validates itself, with values its annotation cannot express (``"pissa_niter_16"``).
    UNCHECKED_FIELDS: ClassVar[tuple[str, ...]] = ("init_lora_weights",)
    #: ``init_lora_weights`` values that leave the base weights as they are, so the saved adapter on
    #: the original base is the trained model wherever it is loaded.
    BASE_KEEPING_INITS: ClassVar[tuple[bool | str, ...]] = (True, False, "gaussian", "orthogonal", "mica")
    #: ``init_lora_weights`` prefixes a subclass sets itself and exports portably (PiSSA: ``"pissa"``).
    OWN_INITS: ClassVar[tuple[str, ...]] = ()
    #: Why a base-keeping init of PEFT's outside ``BASE_KEEPING_INITS`` is refused.
    OTHER_INITS_REFUSED: ClassVar[str] = "PEFT does not support it with this method's layers"

    def __post_init__(self) -> None:
        validate_config(self, limits=self.FIELD_LIMITS, skip=self.UNCHECKED_FIELDS)
        self._check_init()
        self.check()
        super().__post_init__()

    def _check_init(self) -> None:
        init = self.init_lora_weights
        if init == "orthogonal" and init in self.BASE_KEEPING_INITS:
            ranks = (self.r, *(self.rank_pattern or {}).values())
            odd = sorted({rank for rank in ranks if isinstance(rank, int) and rank % 2})
            if odd:
                raise ConfigError(f"init_lora_weights='orthogonal' needs even ranks, got r={odd[0]}; use an even rank")
        if isinstance(init, (bool, str)) and init in self.BASE_KEEPING_INITS:  # 1 == True, but 1 is no init
            return
        if isinstance(init, str) and init.startswith(self.OWN_INITS):
            return
        allowed = ", ".join(repr(value) for value in self.BASE_KEEPING_INITS)
        if not is_peft_init(init):
            raise ConfigError(f"init_lora_weights={init!r} is not an initialisation; use one of {allowed}")
        prefix = next((p for p in _REWRITING_INITS if isinstance(init, str) and init.startswith(p)), None)
        reason = _REWRITING_INITS[prefix] if prefix else self.OTHER_INITS_REFUSED
        who = f"method {self.hf_lowrank_method!r}" if self.hf_lowrank_method else type(self).__name__
        raise ConfigError(f"{who} cannot use init_lora_weights={init!r} ({reason}); use one of {allowed}")

    def serving_card_lines(self, adapter_name: str, adapter_config: Mapping[str, Any]) -> list[str]:
        """The model card's serving section for this adapter as saved (``adapter_config``): what
        LoRA-serving engines (vLLM's PEFT loader) need and refuse. The core's card writer asks a
        config for it; tuners that serving engines do not load say nothing and the card points to
        the merged model."""
        notes = [f"- rank {adapter_config.get('r')}: start the engine with `--max-lora-rank` at least this"]
        if adapter_config.get("use_dora"):
            notes.append(
                "- DoRA: vLLM does not serve DoRA adapters; serve `merged/` (or this adapter merged with "
                "`hf-lowrank merge`) as a plain model instead"
            )
        if adapter_config.get("modules_to_save"):
            notes.append(
                f"- trains `{', '.join(adapter_config['modules_to_save'])}` in full (`modules_to_save`), which "
                "vLLM rejects; serve the merged model"
            )
        if adapter_config.get("bias", "none") != "none":
            notes.append("- carries biases, which vLLM rejects; serve the merged model")
        engine = f"vLLM: `vllm serve BASE --enable-lora --lora-modules name={adapter_name}`"
        return [f"Serving with LoRA-serving engines ({engine}):", "", *notes]

    @staticmethod
    def merged_on_dequantized(
        layer: Any, adapter: str, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The merged weight and bias of a LoRA layer on a 4-bit base, in full precision: what the core's
        merged-checkpoint writer asks the family for (:class:`~hf_lowrank_plugins.streaming.DequantizedMerge`).

        The maths of PEFT's bitsandbytes merge, ``deq(W) + s·B·A`` with DoRA's row scale on top, without
        its last step (quantizing the sum again loses the update). A ``lora_bias`` adapter's bias is
        ``b + s·b_B`` as the forward computes it; PEFT's 4-bit merge adds ``b_B`` unscaled, which is not
        the adapted model where ``s != 1``.
        """
        delta = layer.get_delta_weight(adapter).to(weight.dtype)
        merged = weight + delta
        if layer.use_dora.get(adapter, False):
            magnitude = layer.lora_magnitude_vector[adapter]
            norm = magnitude.get_weight_norm(weight, delta, scaling=1).detach()
            merged = (magnitude.weight / norm).view(-1, 1) * merged
        if bias is not None and layer.lora_bias.get(adapter, False):
            update = layer.lora_B[adapter].bias.detach() * layer.scaling[adapter]
            bias = (bias + update.to(bias.device)).to(bias.dtype)
        return merged, bias

    def check(self) -> None:
        """Method-specific checks, run after every field's type and range was checked; extend in subclasses.

        Raise :class:`~hf_lowrank_plugins.ConfigError` naming the setting and the fix.
        """
