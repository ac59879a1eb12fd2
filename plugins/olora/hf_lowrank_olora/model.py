"""Attach OLoRA on PEFT's LoRA layers (PEFT's own ``olora_init``), keeping the initial factors for export."""

from __future__ import annotations

import logging
from types import MethodType

from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from hf_lowrank_lora import attach_lora, residual
from hf_lowrank_plugins import IncompatibleError, is_quantized
from hf_lowrank_plugins.targets import find_target_modules, is_transposed

logger = logging.getLogger(__name__)


def attach_olora(model: nn.Module, config: LoraConfig, adapter: str = "default") -> PeftModel:
    """Attach OLoRA: B, A from the thin QR of each target W (in fp32), base replaced by W - s*B@A.

    PEFT computes the decomposition (``LoraLayer.olora_init``); the initial factors are then kept
    on the layers (:func:`hf_lowrank_lora.residual.store_initial_factors`) so that export writes a
    plain rank-2r LoRA relative to the original weights, as for PiSSA.
    """
    residual.check_clean_base(model, "OLoRA")
    if is_quantized(model):
        raise IncompatibleError(
            "OLoRA decomposes full-precision weights and rewrites them; a 4-bit base is not supported by this "
            "plugin (load the model in 16/32-bit, or use method 'qlora' for a 4-bit base)"
        )
    transposed = [name for name, m in find_target_modules(model, config.target_modules).items() if is_transposed(m)]
    if transposed:
        # PEFT's olora_init takes the QR of the stored (in x out) weight and gives factors of the wrong shapes
        raise IncompatibleError(
            f"OLoRA on layers that store their weight transposed (GPT-2's Conv1D, e.g. '{transposed[0]}') is not "
            "supported: PEFT's QR initialisation assumes (out x in) weights; use method 'pissa' or 'lora'"
        )
    residual.check_untied_targets(model, config, "OLoRA")
    peft_model = attach_lora(model, config)
    residual.mark_residual_base(peft_model)
    residual.store_initial_factors(peft_model, adapter)
    for layer in peft_model.modules():
        if isinstance(layer, LoraLayer):
            layer.olora_init = MethodType(_no_second_qr, layer)  # type: ignore[method-assign]
    return peft_model


def _no_second_qr(layer: LoraLayer, adapter_name: str) -> None:
    """``olora_init`` of a layer whose base already holds OLoRA's residual: plain LoRA's init instead.

    A second adapter added with the same config (TRL's reference copy) would decompose W_res and
    subtract from the shared base again; plain LoRA's init leaves the base alone.
    """
    logger.warning(
        "adapter %r: the base already holds OLoRA's residual, so it starts as plain LoRA (B = 0) rather than from "
        "a second QR decomposition that would rewrite the shared base",
        adapter_name,
    )
    layer.reset_lora_parameters(adapter_name, True)
