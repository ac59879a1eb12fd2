"""LoftQ: QLoRA's 4-bit base bit for bit, an adapter that repairs its error (PEFT's decomposition), measured."""

from __future__ import annotations

import copy

import pytest
import torch
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
