"""The quantization service: 4-bit NF4 bases for every method (needs the ``quantization`` extra).

One place quantizes, dequantizes and re-quantizes; methods call it, none owns it:

* :func:`quantize_model` turns the linear layers of an in-memory model into bitsandbytes
  ``Linear4bit`` one layer at a time (extra memory: one layer, not a copy of the model), through
  transformers' own quantizer so the result is what ``from_pretrained(...,
  quantization_config=bnb_config(...))`` gives: ``hf_quantizer``, ``is_loaded_in_4bit`` and all
  that PEFT and the Trainer check. Loading a checkpoint in 4-bit directly (:func:`bnb_config`)
  is the cheaper path when the weights are the checkpoint's.
* :func:`dequantize_model` replaces them by full-precision layers holding ``deq(Q(W))`` (merging
  into a 4-bit base must not round the merged weights back to 4 bits).
* :func:`requantize_under_adapter` swaps the base of an adapted model (quantize a residual or a
  pruned base computed in full precision, or dequantize before a merge) and puts the same adapter
  state back on top: "unload, convert, re-attach" written once.

bitsandbytes is imported only when a function needs it, so the core imports without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import BitsAndBytesConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .errors import IncompatibleError
from .method import default_init_fields
from .targets import task_heads
from .types import QuantizationSettings

#: Layer classes of bitsandbytes, recognised by name so bitsandbytes stays optional.
QUANTIZED_LAYERS = ("Linear4bit", "Linear8bitLt")


def is_quantized(model: nn.Module) -> bool:
    """True when any layer of ``model`` (also inside a PEFT wrapper) holds packed low-bit weights."""
    return any(type(m).__name__ in (*QUANTIZED_LAYERS, "Params4bit") for m in model.modules()) or bool(
        getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    )


def dequantized_4bit_weight(module: Any) -> torch.Tensor:
    """``deq(Q(W))`` of a bitsandbytes 4-bit layer's weight, in the layout the layer stores it.

    bitsandbytes' own ``dequantize_4bit``, the call PEFT's ``dequantize_module_weight`` ends in, made
    directly: ``torch.compile`` traces it, where PEFT's helper breaks the graph (it reads the weight's
    ``__class__`` and, on a CPU, reassigns the module's weight on every call).
    """
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)


def _require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise IncompatibleError(
            "a 4-bit base needs bitsandbytes: pip install 'hf-lowrank-plugins[quantization]'"
        ) from exc


def bnb_config(settings: QuantizationSettings) -> BitsAndBytesConfig:
    """The ``BitsAndBytesConfig`` for ``settings``: pass it to ``from_pretrained`` to load straight in 4-bit."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quant_type,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=settings.compute_dtype,
        llm_int8_skip_modules=list(settings.skip_modules) or None,
    )


def with_heads_skipped(settings: QuantizationSettings, model: nn.Module) -> QuantizationSettings:
    """``settings`` with ``model``'s heads added to the modules left in full precision.

    A classifier's head trains in full (``modules_to_save``), and naming any skip list turns off
    transformers' own default skip of the output embedding, so both are named.
    """
    return replace(settings, skip_modules=tuple(dict.fromkeys([*settings.skip_modules, *task_heads(model)])))


def load_quantized(model_dir: str | Path, settings: QuantizationSettings, model_class: Any = None) -> nn.Module:
    """A checkpoint loaded straight in 4-bit: transformers quantizes each tensor as it reads it, so no
    full-precision copy of the model ever exists (the cheapest path when the weights are the
    checkpoint's). Heads stay full precision; the model comes back prepared for k-bit training.
    """
    _require_bitsandbytes()
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    with init_empty_weights():  # the architecture without memory, to find its heads
        skeleton = model_class.from_config(AutoConfig.from_pretrained(model_dir, trust_remote_code=False))
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    model = model_class.from_pretrained(
        model_dir,
        quantization_config=bnb_config(with_heads_skipped(settings, skeleton)),
        dtype=settings.compute_dtype,
        device_map={"": device},
        trust_remote_code=False,
    )
    return prepare_for_training(model)


def quantize_model(model: nn.Module, settings: QuantizationSettings) -> nn.Module:
    """``model`` with its linear layers in 4-bit, in place (output head, task heads, norms stay full
    precision), prepared for k-bit training (non-quantized parameters frozen and in fp32).

    Each layer's weight is quantized where it lies and the full-precision tensor released before
    the next, so the extra memory is one layer's. GPT-2's ``Conv1D`` weights are transposed first,
    exactly as transformers does when loading a checkpoint in 4-bit.
    """
    if not isinstance(model, PreTrainedModel):
        raise IncompatibleError(f"4-bit quantization needs a transformers PreTrainedModel, got {type(model).__name__}")
    if is_quantized(model):
        return prepare_for_training(model)
    _require_bitsandbytes()
    import bitsandbytes as bnb
    from transformers.quantizers.auto import AutoHfQuantizer

    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    originals = {
        name: (module.weight, module.bias)
        for name, module in model.named_modules()
        if type(module) is nn.Linear or isinstance(module, Conv1D)
    }
    quantizer = AutoHfQuantizer.from_config(bnb_config(with_heads_skipped(settings, model)), pre_quantized=False)
    quantizer.preprocess_model(
        model=model, dtype=dtype, device_map={"": str(device)}, checkpoint_files=None, use_kernels=False
    )  # replaces the layers by empty (meta) Linear4bit ones
    for name, layer in model.named_modules():
        if not isinstance(layer, bnb.nn.Linear4bit) or name not in originals:
            continue
        module: Any = layer  # the attributes below are bitsandbytes' and transformers', not nn.Module's
        weight, bias = originals.pop(name)
        value = weight.detach().t() if issubclass(module.source_cls, Conv1D) else weight.detach()
        # The meta Params4bit carries quant_type, blocksize, double quantization; .to(device) quantizes.
        module.weight = bnb.nn.Params4bit(value.contiguous(), requires_grad=False, **module.weight.__dict__)
        module.weight = module.weight.to(device)
        module.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        module._is_hf_initialized = True
        del weight, bias, value
    # layers the quantizer left alone (heads, skipped modules) were never replaced: their weights stay
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    return prepare_for_training(model)


def roundtrip_4bit(weight: torch.Tensor, settings: QuantizationSettings) -> torch.Tensor:
    """``deq(Q(W))`` of one ``(out x in)`` weight, as :func:`quantize_model` would quantize it, on its device.

    The bitsandbytes ``Params4bit`` of :func:`quantize_model`'s layers (quant type, double
    quantization, the default block size, uint8 storage), for a method that needs what 4-bit loses
    before the base is quantized (LoftQ's repair); the loftq plugin's tests check the quantized base
    holds exactly these values.
    """
    _require_bitsandbytes()
    import bitsandbytes as bnb

    unpacked: Any = bnb.nn.Params4bit(  # bitsandbytes overloads Module.to, which its typing does not show
        weight.detach().contiguous(),
        requires_grad=False,
        quant_type=settings.quant_type,
        compress_statistics=settings.double_quant,
        quant_storage=torch.uint8,
    )
    packed = unpacked.to(weight.device)  # .to quantizes, as for the layers of quantize_model
    return bnb.functional.dequantize_4bit(packed.data, packed.quant_state)


def is_4bit_layer(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` holding packed weights."""
    return type(module).__name__ == "Linear4bit" and type(getattr(module, "weight", None)).__name__ == "Params4bit"


@torch.no_grad()
def requantize_4bit_weight(module: Any, weight: torch.Tensor) -> None:
    """Quantize ``weight`` (``out x in``, full precision) into the 4-bit layer ``module`` in place of the
    weight it holds, with the layer's own settings (quant type, block size, double quantization), so
    the layer holds ``Q(weight)``: a residual computed after the base was quantized (QLoRA-GA's
    ``deq(Q(W)) - s·B0·A0`` at train start). The layer object, the adapter on it and every other
    parameter stay, so the optimizer's references do too; deterministic, so a resumed run that
    computes the same residual holds the same bits.
    """
    _require_bitsandbytes()
    import bitsandbytes as bnb

    old = module.weight
    settings = {
        k: v
        for k, v in old.__dict__.items()
        if k in ("blocksize", "compress_statistics", "quant_type", "quant_storage")
    }
    unpacked: Any = bnb.nn.Params4bit(
        weight.detach().to(old.quant_state.dtype).contiguous(), requires_grad=False, module=module, **settings
    )
    module.weight = unpacked.to(old.device)  # .to quantizes


def packed_4bit_tensors(module: Any) -> list[torch.Tensor]:
    """Every tensor that holds a 4-bit layer's weight (the packed codes and the scales, nested ones
    included): what a process must receive to hold another's quantized weight bit for bit."""
    state = module.weight.quant_state
    tensors = [module.weight.data, state.absmax]
    if state.nested:
        tensors += [state.state2.absmax, state.offset]
    return tensors


def prepare_for_training(model: nn.Module) -> nn.Module:
    """PEFT's k-bit preparation, once. Gradient checkpointing is left to ``TrainingArguments``."""
    module: Any
    for module in model.modules():
        # bitsandbytes' CPU backend repacks a Linear4bit's weight in place for an AVX512-BF16 kernel at
        # its first eval-mode forward and then computes in bf16 (1.7e-3 off deq(W) @ x in our test),
        # also for the training steps after an evaluation. Keep the exact dequantize-then-matmul path.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if not getattr(model, "_hf_lowrank_kbit_prepared", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model._hf_lowrank_kbit_prepared = True  # type: ignore[assignment]
    return model


def requantize_under_adapter(model: PeftModel, convert: Callable[[nn.Module], nn.Module]) -> PeftModel:
    """Take the adapter off ``model``, ``convert`` its base, and put the same adapter state back on top.

    ``convert`` is :func:`dequantize_model` (merge in full precision) or a partial of
    :func:`quantize_model` (QPiSSA's residual, SALOR's pruned base). The adapter is re-attached with
    PEFT's default initialisation, which the saved state then overwrites: a data-dependent init
    (an SVD) must not run again on the new base.
    """
    name = model.active_adapter
    config: Any = model.peft_config[name]
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    base = convert(model.unload())
    defaults = default_init_fields(type(config))
    chosen = {field: getattr(config, field) for field in defaults}
    for field, value in defaults.items():
        setattr(config, field, value)
    try:
        restored = get_peft_model(base, config, adapter_name=name)
    finally:
        for field, value in chosen.items():
            setattr(config, field, value)
    set_peft_model_state_dict(restored, state, adapter_name=name)
    return restored


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace 4-bit base layers by full-precision layers holding ``deq(Q(W))``; adapters are kept.

    For a ``PeftModel`` the adapter is taken off, the base dequantized, and the same adapter put
    back, so PEFT's own merge (LoRA, DoRA, ...) then runs in 16/32-bit.
    """
    if isinstance(model, PeftModel):
        return requantize_under_adapter(model, dequantize_model)
    if getattr(model, "hf_quantizer", None) is None:
        raise IncompatibleError("cannot dequantize a model that was not quantized through transformers/bitsandbytes")
    dtype = next(
        (p.dtype for p in model.parameters() if p.dtype in (torch.float32, torch.bfloat16, torch.float16)),
        torch.float32,
    )
    transposed = [name for name, m in model.named_modules() if issubclass(getattr(m, "source_cls", nn.Module), Conv1D)]
    model = model.dequantize(dtype=dtype)  # type: ignore[operator]  # nn.Module.__getattr__ types a transformers/PEFT attribute as Tensor | Module
    for name in transposed:  # transformers gives back nn.Linear; GPT-2's checkpoint layout is Conv1D's (in, out)
        linear: Any = model.get_submodule(name)
        conv = Conv1D(linear.out_features, linear.in_features).to(
            device=linear.weight.device, dtype=linear.weight.dtype
        )
        with torch.no_grad():
            conv.weight.copy_(linear.weight.t())
            if linear.bias is not None:
                conv.bias.copy_(linear.bias)
        model.set_submodule(name, conv)
    return model
