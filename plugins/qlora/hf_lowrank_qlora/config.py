"""QLoRA's config: LoRA's plus the 4-bit quantization of the frozen base."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from hf_lowrank_lora import LoraMethodConfig


@dataclass
class QLoraConfig(LoraMethodConfig):
    """LoRA on a 4-bit base. Defaults follow the QLoRA paper: NF4, double quantization.

    ``bnb_4bit_compute_dtype`` is the dtype each matmul dequantizes to: ``"auto"`` picks bfloat16
    on a GPU and float32 on CPU (bf16 matmuls are slow on CPU). Plain PEFT drops the ``bnb_4bit_*``
    keys when loading the adapter, which is right: they describe the base, not the adapter.
    """

    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type of the base"})
    bnb_4bit_use_double_quant: bool = field(default=True, metadata={"help": "quantize the quantization constants too"})
    bnb_4bit_compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "dtype 4-bit matmuls dequantize to; auto: bfloat16 on a GPU, float32 on CPU"}
    )

    #: PEFT's orthogonal and MiCA inits read the base weight as floats, which a 4-bit base is not
    BASE_KEEPING_INITS: ClassVar[tuple[bool | str, ...]] = (True, False, "gaussian")
