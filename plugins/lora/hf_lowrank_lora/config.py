"""LoRA's config: PEFT's ``LoraConfig`` plus the method tag, so plain PEFT loads our adapters."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig


@dataclass
class LoraMethodConfig(LoraConfig):
    """``peft.LoraConfig`` with ``target_modules="all-linear"`` by default (works for any model).

    ``hf_lowrank_method`` is written to ``adapter_config.json`` so the adapter loads back as this
    class when the plugin is installed; plain PEFT ignores the key and loads a ``LoraConfig``.
    All PEFT options apply: ``r``, ``lora_alpha``, ``use_rslora``, ``lora_dropout``,
    ``target_modules`` (names, regex, ``"all-linear"``), ``exclude_modules``, ``bias``, ...
    """

    target_modules: list[str] | str | None = field(default="all-linear")
    hf_lowrank_method: str = "lora"
