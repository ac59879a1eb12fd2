"""Attach PiSSA on PEFT's LoRA layers: seeded SVD, kept initial factors, optional NF4 residual."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from types import MethodType

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from hf_lowrank_lora import attach_lora, residual
from hf_lowrank_plugins import QuantizationSettings
from hf_lowrank_plugins.memory import release_replaced, weight_locations
from hf_lowrank_plugins.quantization import quantize_model, requantize_under_adapter

logger = logging.getLogger(__name__)


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


@contextmanager
def _old_pages_released() -> Iterator[None]:
    """Hand back each target's old weight pages as soon as PEFT's ``pissa_init`` has replaced it.

    On a CPU the original weights lie in the memory-mapped checkpoint, and their pages stay resident
    beside the new residuals (see :mod:`hf_lowrank_plugins.memory`). Released once after the whole
    attach, every layer's old pages and residual coexisted first: PiSSA's init peaked at 1.44x
    LoRA's training peak on a 378M model. PEFT has no per-layer callback, so its ``pissa_init`` is
    wrapped for this attach only; the computation and its random draws are PEFT's own, unchanged.
    """
    original = LoraLayer.pissa_init

    def pissa_init(self: LoraLayer, adapter_name: str, init_lora_weights: str) -> None:
        locations = weight_locations([self.get_base_layer()])
        original(self, adapter_name, init_lora_weights)
        release_replaced(locations)

    setattr(LoraLayer, "pissa_init", pissa_init)  # noqa: B010
    try:
        yield
    finally:
        setattr(LoraLayer, "pissa_init", original)  # noqa: B010


def _quantize_residual(model: PeftModel, settings: QuantizationSettings, adapter: str) -> PeftModel:
    """QPiSSA: replace W_res by NF4(W_res) and put the same initial A0, B0 back on top."""
    restored = requantize_under_adapter(model, partial(quantize_model, settings=settings))
    setattr(restored.get_base_model(), residual.RESIDUAL_FLAG, True)
    residual.store_initial_factors(restored, adapter)
    return restored


def attach_pissa(
    model: nn.Module,
    config: LoraConfig,
    quantization: QuantizationSettings | None = None,
    adapter: str = "default",
) -> PeftModel:
    """Attach PiSSA: A, B from the top-r SVD of each target W (in fp32), base replaced by W - s*B@A.

    The initial factors are kept on the layers (:func:`hf_lowrank_lora.residual.initial_factors`)
    so that export can write a plain LoRA adapter relative to the original weights. With
    ``quantization`` (``attach(..., load_in_4bit=True)``) or ``config.quantize_residual`` the
    residual is then quantized to NF4 (QPiSSA).
    """
    residual.check_clean_base(
        model,
        "PiSSA",
        quantized_reason="PiSSA needs full-precision weights for its SVD, but the base is already 4-bit. Load the model "
        "in 16/32-bit and use attach(model, 'pissa', load_in_4bit=True) (or quantize_residual=True): the SVD runs in "
        "fp32, then the residual is quantized to NF4 (QPiSSA).",
    )
    residual.check_untied_targets(model, config, "PiSSA")
    with seeded(getattr(config, "svd_seed", 0), model), _old_pages_released():
        peft_model = attach_lora(model, config)
    residual.mark_residual_base(peft_model)
    residual.store_initial_factors(peft_model, adapter)
    if quantization is None and getattr(config, "quantize_residual", False):
        quantization = QuantizationSettings.from_config(config)
    if quantization is not None:
        peft_model = _quantize_residual(peft_model, quantization, adapter)
    for layer in peft_model.modules():
        if isinstance(layer, LoraLayer):
            layer.pissa_init = MethodType(_no_second_svd, layer)  # type: ignore[method-assign]
    return peft_model


def _no_second_svd(layer: LoraLayer, adapter_name: str, init_lora_weights: str) -> None:
    """``pissa_init`` of a layer whose base already holds PiSSA's residual: plain LoRA's init instead.

    A second adapter added with the PiSSA config (TRL's DPO/KTO/GRPO trainers add a "ref" copy of
    the trained one, ``model.add_adapter("ref", peft_config["default"])``) would take the SVD of
    W_res and subtract its top part from the shared base again: the policy would no longer be the
    model PiSSA started from, and the export's conversion (relative to the original W) another
    model. Plain LoRA's init leaves the base alone; TRL then copies the trained adapter into it.
    """
    logger.warning(
        "adapter %r: the base already holds PiSSA's residual, so it starts as plain LoRA (B = 0) rather than "
        "from a second SVD that would rewrite the shared base",
        adapter_name,
    )
    layer.reset_lora_parameters(adapter_name, True)
