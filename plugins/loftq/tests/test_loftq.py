"""LoftQ: QLoRA's 4-bit base bit for bit, an adapter that repairs its error (PEFT's decomposition), measured."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers
from peft.utils.loftq_utils import _low_rank_decomposition

import hf_lowrank_plugins as hlp
from hf_lowrank_lora import lora_layers
from hf_lowrank_plugins import QuantizationSettings
from hf_lowrank_plugins.quantization import dequantized_4bit_weight, roundtrip_4bit
from hf_lowrank_plugins.testing.models import GPT2, LLAMA


def _relative_error(model: torch.nn.Module, batch: dict, reference: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(**batch).logits - reference).norm() / reference.norm())


@pytest.mark.parametrize("case", [LLAMA, GPT2], ids=str)
def test_the_base_is_qloras_and_the_adapter_brings_the_output_closer_to_full_precision(case):
    """The 4-bit base equals QLoRA's bit for bit (NF4(W), which loading the original model in 4-bit gives,
    so the adapter is portable); the initial output is closer to the full-precision model's than QLoRA's
    (s = 4 here: the factors carry 1/s)."""
    full = case.build()
    batch = case.batch()
    with torch.no_grad():
        reference = full(**batch).logits
    loftq = hlp.attach(copy.deepcopy(full), "loftq", r=4, lora_alpha=16)
    qlora = hlp.attach(copy.deepcopy(full), "qlora", r=4, lora_alpha=16)
    ours = {n: m for n, m in loftq.model.named_modules() if hasattr(getattr(m, "weight", None), "quant_state")}
    theirs = {n: m for n, m in qlora.model.named_modules() if hasattr(getattr(m, "weight", None), "quant_state")}
    assert ours.keys() == theirs.keys() and ours
    for name, module in ours.items():
        assert torch.equal(dequantized_4bit_weight(module), dequantized_4bit_weight(theirs[name])), name
    loftq_error, qlora_error = (
        _relative_error(loftq.model, batch, reference),
        _relative_error(qlora.model, batch, reference),
    )
    assert loftq_error < 0.95 * qlora_error, (loftq_error, qlora_error)


def test_the_factors_are_pefts_decomposition_of_the_4bit_error():
    """At s = 1 (where PEFT's own factors are right) A and B equal PEFT's ``_low_rank_decomposition`` of
    W - deq(NF4(W)), the computation of its ``replace_lora_weights_loftq`` (which runs on CUDA/XPU only)."""
    full = LLAMA.build()
    originals = {n: m.weight.detach().clone() for n, m in full.named_modules() if isinstance(m, torch.nn.Linear)}
    adapted = hlp.attach(full, "loftq", r=4, lora_alpha=4)
    settings = QuantizationSettings.from_config(adapted.config)
    for name, layer in lora_layers(adapted.model).items():
        weight = originals[name.removeprefix("base_model.model.")]
        decomposition = _low_rank_decomposition(weight - roundtrip_4bit(weight, settings), reduced_rank=4)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.allclose(A, decomposition["R"], rtol=1e-5, atol=1e-6), name
        assert torch.allclose(B, decomposition["L"], rtol=1e-5, atol=1e-6), name


def test_an_already_quantized_model_is_refused_with_the_remedy():
    from hf_lowrank_plugins.quantization import quantize_model

    quantized = quantize_model(LLAMA.build(), QuantizationSettings(compute_dtype=torch.float32))
    with pytest.raises(hlp.IncompatibleError, match=r"needs the full-precision weights: load the model in 16/32-bit"):
        hlp.attach(quantized, "loftq", r=4)


def test_plan_counts_one_fp32_decomposition():
    from hf_lowrank_plugins.plan import plan_memory
    from hf_lowrank_plugins.testing.helpers import tiny_llama_config

    config = tiny_llama_config()
    plan = plan_memory(config, "loftq", hlp.PlanSettings(dtype=torch.float32), r=4)
    assert plan.terms["loftq_svd"] == 3 * config.hidden_size * config.intermediate_size * 4


def _peft_loftq_init_on_this_device():
    """PEFT's own ``loftq_init`` (Algorithm 1 with ``loftq_iter`` rounds), with the one line that sends
    every weight to CUDA/XPU pointed at this CPU instead: the reference, run as PEFT wrote it."""
    import inspect

    from peft.utils import loftq_utils

    source = inspect.getsource(loftq_utils.loftq_init)
    device_line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert device_line in source, "PEFT's loftq_init changed; update this reference"
    namespace = dict(vars(loftq_utils))
    exec(source.replace(device_line, 'compute_device = "cpu"'), namespace)
    return namespace["loftq_init"]


@pytest.mark.parametrize("iterations", [2, 4])
def test_alternations_equal_pefts_loftq_init(iterations):
    """T alternations: A, B and the 4-bit base equal PEFT's ``loftq_init(num_iter=T)`` at s = 1 with PEFT's
    quantization (NF4, no double quantization); the base is NF4(W - s*B@A) of the last round, not NF4(W)."""
    full = LLAMA.build()
    originals = {n: m.weight.detach().clone() for n, m in full.named_modules() if isinstance(m, torch.nn.Linear)}
    settings = QuantizationSettings(double_quant=False, compute_dtype=torch.float32)
    adapted = hlp.attach(full, "loftq", r=4, lora_alpha=4, loftq_iter=iterations, quantization=settings)
    peft_loftq_init = _peft_loftq_init_on_this_device()
    for name, layer in lora_layers(adapted.model).items():
        weight = originals[name.removeprefix("base_model.model.")]
        base, lora_A, lora_B = peft_loftq_init(weight, num_bits=4, reduced_rank=4, num_iter=iterations)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.allclose(A, lora_A, rtol=1e-4, atol=1e-6), name
        assert torch.allclose(B, lora_B, rtol=1e-4, atol=1e-6), name
        ours = dequantized_4bit_weight(layer.get_base_layer())
        # the last round quantizes W - L@R, computed from factors equal to PEFT's within float rounding:
        # a code on a rounding boundary may land in the neighbouring bin, nothing more
        assert (ours != base).float().mean() <= 1e-3 and (ours - base).abs().max() <= 0.2 * weight.abs().max(), name
        assert not torch.equal(ours, roundtrip_4bit(weight, settings)), name  # not NF4(W)


@pytest.mark.integration
def test_more_alternations_start_closer_to_full_precision_and_export_their_base(tmp_path):
    """The initial error falls with T on the test model, and the export writes base/ (the trained 4-bit base,
    dequantized) with adapter/ naming it: loaded in 4-bit under it, the trained model comes back (exactly
    without double quantization, whose scales a loader rounds again)."""
    full = LLAMA.build()
    batch = LLAMA.batch()
    with torch.no_grad():
        reference = full(**batch).logits
    errors = {}
    for iterations in (1, 2, 5):
        adapted = hlp.attach(copy.deepcopy(full), "loftq", r=4, loftq_iter=iterations)
        errors[iterations] = _relative_error(adapted.model, batch, reference)
    assert errors[5] < errors[2] < errors[1], errors
    adapted = hlp.attach(copy.deepcopy(full), "loftq", r=4, loftq_iter=2, bnb_4bit_use_double_quant=False)
    adapted.model.eval()
    with torch.no_grad():
        trained = adapted.model(**batch).logits
    result = adapted.export(tmp_path / "out", merge=True)
    base_dir = tmp_path / "out" / "base"
    assert result.adapter_dir is not None and (base_dir / "config.json").is_file()
    named = json.loads((result.adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(named) == base_dir.resolve()
    from hf_lowrank_plugins.quantization import quantize_model

    base = quantize_model(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir), QuantizationSettings.from_config(adapted.config)
    )
    reloaded = hlp.load_adapter(base, result.adapter_dir).model.eval()
    assert _relative_error(reloaded, batch, trained) <= 1e-6
