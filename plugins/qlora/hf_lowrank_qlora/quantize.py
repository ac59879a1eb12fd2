"""Quantize a model's base to 4-bit and back, with transformers' bitsandbytes integration.

We do not re-implement the replacement of layers: an in-memory model is written to a temporary
safetensors checkpoint and reloaded with ``BitsAndBytesConfig``, the same path as
``from_pretrained(..., quantization_config=...)``, so the result carries ``hf_quantizer`` and
everything PEFT and the Trainer check for. A model already loaded in 4-bit is used as it is.
"""

from __future__ import annotations

import tempfile

import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import BitsAndBytesConfig, PreTrainedModel

from hf_lowrank_plugins import IncompatibleError, QuantizationSettings


def bnb_config(settings: QuantizationSettings) -> BitsAndBytesConfig:
    """The ``BitsAndBytesConfig`` for ``settings`` (to load a large model straight in 4-bit)."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quant_type,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=settings.compute_dtype,
        llm_int8_skip_modules=list(settings.skip_modules) or None,
    )


def quantize_model(model: nn.Module, settings: QuantizationSettings) -> PreTrainedModel:
    """A copy of ``model`` with its linear layers in 4-bit (output head and norms stay full precision),
    prepared for k-bit training (frozen, non-quantized parameters in fp32)."""
    if not isinstance(model, PreTrainedModel):
        raise IncompatibleError(f"4-bit quantization needs a transformers PreTrainedModel, got {type(model).__name__}")
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    with tempfile.TemporaryDirectory(prefix="hf-lowrank-quantize-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        quantized = type(model).from_pretrained(
            tmp, quantization_config=bnb_config(settings), dtype=dtype, device_map={"": str(device)}
        )
    return prepare_for_training(quantized)


def prepare_for_training(model: PreTrainedModel) -> PreTrainedModel:
    """PEFT's k-bit preparation, once. Gradient checkpointing is left to ``TrainingArguments``."""
    for module in model.modules():
        # bitsandbytes' CPU backend repacks a Linear4bit's weight in place for an AVX512-BF16 kernel at
        # its first eval-mode forward and then computes in bf16 (1.7e-3 off deq(W) @ x in our test),
        # also for the training steps after an evaluation. Keep the exact dequantize-then-matmul path.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if not getattr(model, "_hf_lowrank_kbit_prepared", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model._hf_lowrank_kbit_prepared = True
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace 4-bit base layers by full-precision ``nn.Linear`` holding deq(Q(W)).

    For a ``PeftModel`` the adapter is taken off, the base dequantized, and the same adapter state
    put back on the full-precision base, so PEFT's own merge (LoRA, DoRA, ...) then runs in 16/32-bit.
    """
    if isinstance(model, PeftModel):
        name = model.active_adapter
        config = model.peft_config[name]
        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
        base = dequantize_model(model.unload())
        # init_lora_weights=True: the saved state overwrites the adapter, so skip data-dependent inits
        init = config.init_lora_weights
        config.init_lora_weights = True
        try:
            restored = get_peft_model(base, config, adapter_name=name)
        finally:
            config.init_lora_weights = init
        set_peft_model_state_dict(restored, state, adapter_name=name)
        return restored
    if getattr(model, "hf_quantizer", None) is None:
        raise IncompatibleError("cannot dequantize a model that was not quantized through transformers/bitsandbytes")
    dtype = next((p.dtype for n, p in model.named_parameters() if p.dtype in (torch.float32, torch.bfloat16, torch.float16)), torch.float32)
    return model.dequantize(dtype=dtype)
