"""DoRA's config: LoRA's with ``use_dora=True``, so plain PEFT loads (and merges) our adapters."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

from peft import LoraConfig

from hf_lowrank_lora import LoraMethodConfig
from hf_lowrank_plugins import ConfigError


@dataclass
class DoraConfig(LoraMethodConfig):
    """``LoraMethodConfig`` with ``use_dora=True``: W' = m * (W + s*B@A) / ||W + s*B@A|| per output row.

    ``peft_type`` stays ``LORA`` and ``use_dora`` is written to ``adapter_config.json``, so
    ``peft.PeftModel.from_pretrained`` rebuilds the DoRA layers without this package. Every LoRA
    option applies (``r``, ``lora_alpha``, ``use_rslora``, ``target_modules``, ...), except
    ``lora_bias=True``, which PEFT does not support with DoRA.
    """

    # keep PEFT's field metadata: its layer code finds LoRA variants by the "is_lora_variant" tag
    use_dora: bool = field(default=True, metadata=next(f.metadata for f in fields(LoraConfig) if f.name == "use_dora"))

    #: PEFT refuses MiCA's variant beside DoRA's
    BASE_KEEPING_INITS: ClassVar[tuple[bool | str, ...]] = (True, False, "gaussian", "orthogonal")

    def __post_init__(self) -> None:
        # use_dora=False would silently train plain LoRA under the name "dora"
        if not self.use_dora:
            raise ConfigError("method 'dora' needs use_dora=True; for plain LoRA use attach(model, 'lora', ...)")
        super().__post_init__()
