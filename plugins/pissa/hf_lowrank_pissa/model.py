"""Attach PiSSA on PEFT's LoRA layers: seeded SVD, kept initial factors, optional NF4 residual."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from hf_lowrank_lora import attach_lora
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from hf_lowrank_plugins import IncompatibleError, QuantizationSettings, is_quantized

#: Set on a base model whose weights were replaced by PiSSA residuals W - s*B0@A0.
RESIDUAL_FLAG = "_hf_lowrank_pissa_residual"
#: Non-persistent buffers on each LoRA layer holding the initial factors (not in any state dict).
INITIAL_A, INITIAL_B = "hf_lowrank_pissa_A0_", "hf_lowrank_pissa_B0_"


def check_clean_base(model: nn.Module) -> None:
    """Raise :class:`IncompatibleError` unless ``model`` is an untouched full-precision base.

    PiSSA rewrites the base weights (W -> W - s*B0@A0). On a model that already carries adapters,
    those adapters would silently run on changed weights (peft#2184); on a base whose weights are
    already residuals, a second SVD would remove principal directions twice.
    """
    if isinstance(model, PeftModel) or getattr(model, "_hf_peft_config_loaded", False) or any(
        isinstance(m, BaseTunerLayer) for m in model.modules()
    ):
        raise IncompatibleError(
            "PiSSA changes the base weights (W -> W - s*B@A), so it cannot be attached to a model that "
            "already carries adapters: they would run on different weights. Load the base model again "
            "and attach PiSSA to it, or merge the other adapter first (merge_and_unload())."
        )
    if getattr(model, RESIDUAL_FLAG, False):
        raise IncompatibleError(
            "this model's weights are PiSSA residuals (W - s*B0@A0) left by an earlier PiSSA attach/unload(); "
            "load the original base model again. Only if you merged the adapter back yourself, clear the flag "
            f"with `del model.{RESIDUAL_FLAG}`."
        )
    if is_quantized(model):
        raise IncompatibleError(
            "PiSSA needs full-precision weights for its SVD, but the base is already 4-bit (load_in_4bit=True "
            "quantizes before the adapter is attached). For QPiSSA load the model in 16/32-bit and use "
            "attach(model, 'pissa', quantize_residual=True): SVD in fp32, then the residual is quantized to NF4."
        )


@contextmanager
def seeded(seed: int, model: nn.Module) -> Iterator[None]:
    """Fix the global RNGs of ``model``'s devices to ``seed`` inside the block, restoring them after.

    ``torch.svd_lowrank`` draws its random projection from the default generator and takes no
    generator argument; forking the RNG state makes PEFT's fast PiSSA init deterministic.
    """
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def initial_factors(model: nn.Module, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The PiSSA factors (A0, B0) captured at attach time, by LoRA layer name in ``model``."""
    out = {}
    for name, module in model.named_modules():
        a0, b0 = getattr(module, INITIAL_A + adapter, None), getattr(module, INITIAL_B + adapter, None)
        if a0 is not None and b0 is not None:
            out[name] = (a0, b0)
    return out


def _store_initial_factors(model: PeftModel, adapter: str) -> None:
    # non-persistent buffers follow .to(device) but stay out of checkpoints and PEFT's state dicts
    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            module.register_buffer(INITIAL_A + adapter, module.lora_A[adapter].weight.detach().clone(), persistent=False)
            module.register_buffer(INITIAL_B + adapter, module.lora_B[adapter].weight.detach().clone(), persistent=False)


def _quantize_residual(model: PeftModel, config: LoraConfig, adapter: str) -> PeftModel:
    """QPiSSA: replace W_res by NF4(W_res) and put the same initial A0, B0 back on top."""
    try:
        from hf_lowrank_qlora import quantize_model
    except ImportError as exc:
        raise IncompatibleError(
            "quantize_residual=True needs hf-lowrank-qlora (pip install hf-lowrank-pissa[qpissa], "
            "or pip install -e plugins/qlora in this repository)"
        ) from exc
    factors = initial_factors(model, adapter)
    residual = model.unload()  # the base, now holding W_res in full precision
    quantized = quantize_model(residual, QuantizationSettings.from_config(config))
    setattr(quantized, RESIDUAL_FLAG, True)
    # attach plain LoRA layers (no second SVD on NF4 weights), then load the fp32 factors into them
    init = config.init_lora_weights
    config.init_lora_weights = True
    try:
        restored = attach_lora(quantized, config)
    finally:
        config.init_lora_weights = init
    modules = dict(restored.named_modules())
    with torch.no_grad():
        for name, (a0, b0) in factors.items():
            modules[name].lora_A[adapter].weight.copy_(a0)
            modules[name].lora_B[adapter].weight.copy_(b0)
    _store_initial_factors(restored, adapter)
    return restored


def attach_pissa(model: nn.Module, config: LoraConfig, adapter: str = "default") -> PeftModel:
    """Attach PiSSA: A, B from the top-r SVD of each target W (in fp32), base replaced by W - s*B@A.

    The initial factors are kept on the layers (see :func:`initial_factors`) so that export can
    write a plain LoRA adapter relative to the original weights. With
    ``config.quantize_residual`` the residual is then quantized to NF4 (QPiSSA).
    """
    check_clean_base(model)
    with seeded(getattr(config, "svd_seed", 0), model):
        peft_model = attach_lora(model, config)
    setattr(peft_model.get_base_model(), RESIDUAL_FLAG, True)
    _store_initial_factors(peft_model, adapter)
    if getattr(config, "quantize_residual", False):
        peft_model = _quantize_residual(peft_model, config, adapter)
    return peft_model
