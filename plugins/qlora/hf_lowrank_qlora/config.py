"""QLoRA's config: LoRA's plus the 4-bit quantization of the frozen base."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hf_lowrank_lora import LoraMethodConfig
from hf_lowrank_plugins import QuantizationFields


@dataclass
class QLoraConfig(LoraMethodConfig, QuantizationFields):
    """LoRA on a 4-bit base. Defaults follow the QLoRA paper: NF4, double quantization.

    ``bnb_4bit_compute_dtype`` is the dtype each matmul dequantizes to: ``"auto"`` picks bfloat16
    on a GPU and float32 on CPU (bf16 matmuls are slow on CPU). Plain PEFT drops the ``bnb_4bit_*``
    keys when loading the adapter, which is right: they describe the base, not the adapter.
    """

    #: PEFT's orthogonal and MiCA inits read the base weight as floats, which a 4-bit base is not
    BASE_KEEPING_INITS: ClassVar[tuple[bool | str, ...]] = (True, False, "gaussian")
