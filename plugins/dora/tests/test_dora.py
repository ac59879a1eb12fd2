"""DoRA: identity at init, detached norm, training, merged export, 4-bit base, fast inference."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.testing.helpers import logits, make_tiny_model, rel_err, training_args


def _train(adapted, tmp_path, dataset, **kw):
    trainer = Trainer(
        model=adapted.model,
        args=training_args(tmp_path / "run", **kw),
        train_dataset=dataset,
        **adapted.trainer_kwargs(),
    )
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_identity_at_init_and_trainable_parameters(tiny_model, batch):
    ref = logits(tiny_model, batch)
    adapted = hlp.attach(tiny_model, "dora", r=4)
    assert type(adapted.config).__name__ == "DoraConfig" and adapted.config.use_dora
    assert rel_err(logits(adapted.model, batch), ref) <= 1e-5
    names = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
    # 14 linear layers x (A, B, magnitude)
    assert len([n for n in names if "lora_magnitude_vector" in n]) == 14 and len(names) == 42
    layer = adapted.model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.allclose(layer.lora_magnitude_vector["default"].weight, layer.base_layer.weight.norm(dim=1))


def test_use_dora_false_is_refused():
    with pytest.raises(hlp.ConfigError, match="use_dora=True"):
        hlp.make_config("dora", use_dora=False)


def test_magnitude_gets_gradient_and_weight_norm_is_detached():
    """PEFT's gradients equal a hand-written DoRA whose norm ||W + s*B@A|| is a constant (paper 4.3)."""
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(12, 10, bias=False))
    cfg = LoraConfig(r=3, lora_alpha=6, use_dora=True, target_modules=["0"])
    model = get_peft_model(lin, cfg)
    layer = model.base_model.model[0]
    with torch.no_grad():  # non-zero B so the norm depends on the adapter
        layer.lora_B["default"].weight.normal_(0, 0.3)
        layer.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 1.5, 10))
    x, target = torch.randn(5, 12), torch.randn(5, 10)
    torch.nn.functional.mse_loss(model(x), target).backward()

    W = layer.base_layer.weight.detach()
    A = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    B = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    m = layer.lora_magnitude_vector["default"].weight.detach().clone().requires_grad_()
    s = layer.scaling["default"]

    def manual(detach: bool):
        V = W + s * B @ A
        norm = V.norm(dim=1)
        norm = norm.detach() if detach else norm
        return torch.nn.functional.mse_loss(x @ (m[:, None] * V / norm[:, None]).T, target)

    gA, gB, gm = torch.autograd.grad(manual(detach=True), (A, B, m))
    gA_full, gB_full, _ = torch.autograd.grad(manual(detach=False), (A, B, m))
    peft_gm = layer.lora_magnitude_vector["default"].weight.grad
    assert peft_gm is not None and peft_gm.abs().max() > 0
    assert torch.allclose(peft_gm, gm, atol=1e-6, rtol=1e-5)
    assert torch.allclose(layer.lora_A["default"].weight.grad, gA, atol=1e-6, rtol=1e-5)
    assert torch.allclose(layer.lora_B["default"].weight.grad, gB, atol=1e-6, rtol=1e-5)
    # and it is not the gradient through the norm (the test can tell the two apart)
    assert (layer.lora_B["default"].weight.grad - gB_full).abs().max() > 1e-3
    assert (layer.lora_A["default"].weight.grad - gA_full).abs().max() > 1e-4


def test_trains_with_plain_trainer_and_merged_export_matches(batch, token_dataset, tmp_path):
    adapted = hlp.attach(make_tiny_model(), "dora", r=4)
    losses = _train(adapted, tmp_path, token_dataset)
    assert losses[-1] < losses[0] - 0.05
    mag = adapted.model.base_model.model.model.layers[0].mlp.up_proj.lora_magnitude_vector["default"].weight
    base_norm = adapted.model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.norm(dim=1)
    assert (mag - base_norm).abs().max() > 1e-4  # the magnitude itself trained
    adapted.model.eval()
    trained = logits(adapted.model, batch)
    result = adapted.export(tmp_path / "out", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert (logits(merged, batch) - trained).abs().max() <= 1e-4
    # the adapter reloads as DoRA onto a fresh base (use_dora is in adapter_config.json)
    reloaded = hlp.load_adapter(make_tiny_model(), result.adapter_dir)
    assert reloaded.method.name == "dora" and reloaded.config.use_dora
    assert (logits(reloaded.model, batch) - trained).abs().max() <= 1e-5


def test_fast_inference_cache_and_merge_give_the_same_logits(batch, token_dataset, tmp_path):
    from hf_lowrank_dora import cache_for_inference, fast_inference

    adapted = hlp.attach(make_tiny_model(), "dora", r=4)
    _train(adapted, tmp_path, token_dataset, max_steps=3)
    adapted.model.eval()
    ref = logits(adapted.model, batch)
    with fast_inference(adapted.model, mode="cache") as m:
        first, second = logits(m, batch), logits(m, batch)
        layer = m.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"]
        assert layer._dora_cache  # norms and B@A were cached
    assert (first - ref).abs().max() <= 1e-5 and torch.equal(first, second)
    with fast_inference(adapted.model, mode="merge") as m:
        assert (logits(m, batch) - ref).abs().max() <= 1e-4
    # unmerged again; unmerging subtracts the update back, so equal up to float rounding
    assert (logits(adapted.model, batch) - ref).abs().max() <= 1e-5
    cache_for_inference(adapted.model)
    try:
        assert (logits(adapted.model, batch) - ref).abs().max() <= 1e-5
    finally:
        cache_for_inference(adapted.model, enabled=False)


def test_qdora_trains_on_4bit_base_and_merges_dequantized(batch, token_dataset, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from hf_lowrank_dora import fast_inference

    adapted = hlp.attach(make_tiny_model(), "dora", r=4, load_in_4bit=True)
    assert sum(type(m) is bnb.nn.Linear4bit for m in adapted.model.modules()) == 14
    losses = _train(adapted, tmp_path, token_dataset)
    assert losses[-1] < losses[0] - 0.05
    adapted.model.eval()  # the qlora plugin disabled bnb's bf16 CPU repacking: eval is exact too
    trained = logits(adapted.model, batch)
    result = adapted.export(tmp_path / "out", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert merged.dtype == torch.float32 and not hlp.is_quantized(merged)
    # merged W = deq(Q(W)) with DoRA folded in, in fp32: only float rounding separates the two
    assert (logits(merged, batch) - trained).abs().max() <= 1e-4
    with fast_inference(adapted.model, mode="cache") as m:
        assert (logits(m, batch) - trained).abs().max() <= 1e-5
    with pytest.raises(hlp.IncompatibleError, match="mode='cache'"):
        with fast_inference(adapted.model, mode="merge"):
            pass
