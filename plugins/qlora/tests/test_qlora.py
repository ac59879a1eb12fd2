"""QLoRA: a real NF4 base (bitsandbytes CPU backend), training, dequantized merge."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.testing.helpers import logits, make_tiny_model, rel_err, training_args

pytest.importorskip("bitsandbytes")


def _linear4bit_count(model):
    import bitsandbytes as bnb

    return sum(type(m) is bnb.nn.Linear4bit for m in model.modules())


def test_qlora_quantizes_to_nf4_with_double_quant_and_keeps_the_head(batch):
    base = make_tiny_model()
    adapted = hlp.attach(base, "qlora", r=4)
    weight = adapted.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert weight.quant_type == "nf4" and weight.quant_state.nested  # double quantization
    assert _linear4bit_count(adapted.model) == 14
    assert type(adapted.model.base_model.model.lm_head).__name__ == "Linear"
    # NF4 rounding is the only change: identity w.r.t. the quantized base, small error w.r.t. fp32
    quantized_only = hlp.attach(make_tiny_model(), "lora", load_in_4bit=True, r=4)
    with quantized_only.model.disable_adapter():
        ref_q = logits(quantized_only.model, batch)
    assert rel_err(logits(quantized_only.model, batch), ref_q) <= 1e-6
    assert 0 < rel_err(ref_q, logits(make_tiny_model(), batch)) < 0.1


@pytest.mark.integration
def test_qlora_trains_and_merges_into_a_full_precision_checkpoint(batch, token_dataset, tmp_path):
    adapted = hlp.attach(make_tiny_model(), "qlora", r=4)
    trainer = Trainer(
        model=adapted.model,
        args=training_args(tmp_path / "run"),
        train_dataset=token_dataset,
        **adapted.trainer_kwargs(),
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0] - 0.05
    adapted.model.eval()
    trained = logits(adapted.model, batch)
    result = adapted.export(tmp_path / "out", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert _linear4bit_count(merged) == 0 and merged.dtype == torch.float32
    assert getattr(merged.config, "quantization_config", None) is None
    assert (logits(merged, batch) - trained).abs().max() <= 1e-4
    # the 4-bit model is still usable after export
    assert torch.equal(logits(adapted.model, batch), trained)


def test_method_that_cannot_use_a_4bit_base_states_why(tiny_model):
    from hf_lowrank_lora import LoraMethodConfig

    class FullWeights:
        @hlp.hookimpl
        def describe_methods(self):
            cfg = type("FullCfg", (LoraMethodConfig,), {})
            return [
                hlp.MethodInfo(
                    name="fullweights", config_class=cfg, trains_adapter=False, no_quantized_base="it rewrites W itself"
                )
            ]

    reg = hlp.Registry(autoload=False)
    reg.register(FullWeights(), name="fullweights")
    with pytest.raises(
        hlp.IncompatibleError, match=r"cannot train on a quantized \(4-bit\) base: it rewrites W itself"
    ):
        hlp.attach(tiny_model, "fullweights", load_in_4bit=True, registry=reg)
    assert reg.get("fullweights").as_dict()["supports_quantized_base"] is False


def test_4bit_is_a_core_service_any_method_gets(tiny_model, batch):
    """No qlora plugin installed: lora on a 4-bit base still works (the core quantizes)."""
    import hf_lowrank_lora.plugin as lora_plugin

    reg = hlp.Registry(autoload=False)
    reg.register(lora_plugin, name="lora")
    adapted = hlp.attach(tiny_model, "lora", load_in_4bit=True, r=2, registry=reg)
    assert _linear4bit_count(adapted.model) == 14 and hlp.is_quantized(adapted.model)
