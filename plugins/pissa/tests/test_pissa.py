"""PiSSA: SVD init formula, seeded fast SVD, portable rank-2r LoRA export, refusals, QPiSSA."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, Trainer

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.testing.helpers import logits, make_tiny_model, plain_peft_logits, rel_err, training_args


def _train(adapted, tmp_path, dataset, **kw):
    kw.setdefault("learning_rate", 3e-3)  # tiny random model: far above the paper's 2e-5
    trainer = Trainer(
        model=adapted.model,
        args=training_args(tmp_path / "run", **kw),
        train_dataset=dataset,
        **adapted.trainer_kwargs(),
    )
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def _q_proj(adapted):
    return adapted.model.base_model.model.model.layers[0].self_attn.q_proj


def test_exact_init_follows_the_paper_and_keeps_the_output(tiny_model, batch):
    ref = logits(tiny_model, batch)
    W = tiny_model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    adapted = hlp.attach(tiny_model, "pissa", r=4, lora_alpha=8)
    s = 8 / 4
    assert adapted.config.init_lora_weights == "pissa" and adapted.config.lora_dropout == 0
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    A = torch.diag(S[:4].sqrt()) @ Vh[:4] / s**0.5
    B = U[:, :4] @ torch.diag(S[:4].sqrt()) / s**0.5
    layer = _q_proj(adapted)
    assert torch.allclose(layer.lora_A["default"].weight, A, atol=1e-6)
    assert torch.allclose(layer.lora_B["default"].weight, B, atol=1e-6)
    assert torch.allclose(layer.base_layer.weight, W - s * B @ A, atol=1e-6)
    assert rel_err(logits(adapted.model, batch), ref) <= 1e-5


def test_alpha_defaults_to_r():
    cfg = hlp.make_config("pissa", r=8)
    assert cfg.lora_alpha == 8 and cfg.init_lora_weights == "pissa"
    assert hlp.make_config("pissa", r=8, svd="fast", svd_niter=4).init_lora_weights == "pissa_niter_4"
    with pytest.raises(hlp.ConfigError, match="svd must be"):
        hlp.make_config("pissa", svd="approx")


def test_fast_svd_is_seeded_and_reproducible(batch):
    def attach(seed):
        model = make_tiny_model()
        ref = logits(model, batch)
        adapted = hlp.attach(model, "pissa", r=4, svd="fast", svd_niter=4, svd_seed=seed)
        return adapted, ref

    (a1, ref), (a2, _), (a3, _) = attach(0), attach(0), attach(1)
    assert a1.config.init_lora_weights == "pissa_niter_4"
    assert rel_err(logits(a1.model, batch), ref) <= 1e-5
    s1, s2, s3 = (dict(a.model.named_parameters()) for a in (a1, a2, a3))
    assert all(torch.equal(s1[k], s2[k]) for k in s1)  # same seed: bit-identical A, B and W_res
    assert not all(torch.equal(s1[k], s3[k]) for k in s1 if "lora_A" in k)
    # the global RNG is left as it was
    model = make_tiny_model()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    hlp.attach(model, "pissa", r=4, svd="fast", svd_niter=4)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("svd", [{"svd": "exact"}, {"svd": "fast", "svd_niter": 2}])
@pytest.mark.integration
def test_trains_and_exports_a_plain_lora_on_the_original_weights(batch, token_dataset, tmp_path, svd):
    base_dir = tmp_path / "base"
    make_tiny_model().save_pretrained(base_dir)
    adapted = hlp.attach(AutoModelForCausalLM.from_pretrained(base_dir), "pissa", r=4, **svd)
    losses = _train(adapted, tmp_path, token_dataset)
    assert losses[-1] < losses[0] - 0.05
    adapted.model.eval()
    trained = logits(adapted.model, batch)
    result = adapted.export(tmp_path / "out", merge=True)
    cfg = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8 and cfg["init_lora_weights"] is True
    assert json.loads((result.adapter_dir / "hf_lowrank_method.json").read_text())["method"] == "lora"
    plain, config_class = plain_peft_logits(base_dir, result.adapter_dir, batch, tmp_path)
    assert config_class == "LoraConfig"
    assert rel_err(plain, trained) <= 1e-5
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert (logits(merged, batch) - trained).abs().max() <= 1e-4
    # the initial factors never leak into checkpoints
    assert not any("hf_lowrank" in k for k in adapted.model.state_dict())


def test_rslora_and_rank_pattern_conversion_keeps_every_scaling(batch, tmp_path):
    adapted = hlp.attach(
        make_tiny_model(),
        "pissa",
        r=4,
        lora_alpha=6,
        use_rslora=True,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    with torch.no_grad():  # stand-in for training: move every factor
        g = torch.Generator().manual_seed(0)
        for n, p in adapted.model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    trained = logits(adapted.model, batch)
    result = adapted.export(tmp_path / "out")
    cfg = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and abs(cfg["lora_alpha"] - 6 * 2**0.5) < 1e-9 and cfg["rank_pattern"] == {"q_proj": 4}
    loaded = PeftModel.from_pretrained(make_tiny_model(), str(result.adapter_dir))
    assert rel_err(logits(loaded, batch), trained) <= 1e-5


@pytest.mark.parametrize(
    "settings",
    [
        {"target_modules": ["q_proj", "lm_head"]},  # PEFT saves a targeted head's base weight: W_res here
        {"target_modules": ["q_proj", "embed_tokens"]},  # an embedding adapter PiSSA leaves at rank r
    ],
    ids=["lm_head", "embedding"],
)
@pytest.mark.integration
def test_the_exported_adapter_reloads_in_plain_peft_off_the_usual_targets(batch, tmp_path, settings):
    """plain PEFT loaded W_res under the head's rank-2r adapter (54% off), an embedding's rank-r factors did not
    load into the rank-2r config."""
    base_dir = tmp_path / "base"
    make_tiny_model().save_pretrained(base_dir)
    adapted = hlp.attach(AutoModelForCausalLM.from_pretrained(base_dir), "pissa", r=4, **settings)
    with torch.no_grad():  # stand-in for training: move every trainable tensor
        g = torch.Generator().manual_seed(0)
        for p in adapted.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    trained = logits(adapted.model, batch)
    result = adapted.export(tmp_path / "out")
    plain, _ = plain_peft_logits(base_dir, result.adapter_dir, batch, tmp_path)
    assert rel_err(plain, trained) <= 1e-5


def test_a_classifier_with_every_bias_trained_exports(tmp_path):
    """bias="all" on a classifier saves the trained head's bias under two names sharing memory, which
    safetensors refuses: the export failed where PEFT's own save works."""
    import copy

    from hf_lowrank_plugins.testing.models import BERT_CLS, output

    base = BERT_CLS.build()
    pristine = copy.deepcopy(base)
    adapted = hlp.attach(base, "pissa", r=4, bias="all")
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in adapted.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    batch = BERT_CLS.batch()
    trained = output(adapted.model.eval(), batch)
    result = adapted.export(tmp_path / "out")
    reloaded = PeftModel.from_pretrained(pristine, str(result.adapter_dir))
    assert rel_err(output(reloaded.eval(), batch), trained) <= 1e-5


def test_a_target_tied_to_another_module_is_refused():
    """The residual would be taken out of the embedding the head shares too: PEFT's PiSSA on GPT-2's tied head
    starts 32% away from the base."""
    with pytest.raises(hlp.IncompatibleError, match="'lm_head', which 'model.embed_tokens' shares"):
        hlp.attach(make_tiny_model(tie_word_embeddings=True), "pissa", r=2, target_modules=["q_proj", "lm_head"])
    hlp.attach(make_tiny_model(tie_word_embeddings=False), "pissa", r=2, target_modules=["q_proj", "lm_head"])


def test_refuses_models_with_adapters_or_residual_weights(tiny_model):
    from peft import LoraConfig, inject_adapter_in_model

    injected = inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), make_tiny_model())
    with pytest.raises(hlp.IncompatibleError, match="PiSSA changes the base weights"):
        hlp.attach(injected, "pissa", r=2)
    adapted = hlp.attach(tiny_model, "pissa", r=2)
    with pytest.raises(hlp.IncompatibleError, match="already carries a PEFT adapter"):
        hlp.attach(adapted.model, "pissa", r=2)
    residual_base = adapted.model.unload()
    with pytest.raises(hlp.IncompatibleError, match="weights are residuals"):
        hlp.attach(residual_base, "pissa", r=2)


def test_load_in_4bit_runs_the_svd_before_quantizing(batch):
    """load_in_4bit=True gives exactly QPiSSA (SVD on fp32 W, NF4 residual); a 4-bit base is refused."""
    pytest.importorskip("bitsandbytes")
    via_flag = hlp.attach(make_tiny_model(), "pissa", r=4, load_in_4bit=True)
    via_config = hlp.attach(make_tiny_model(), "pissa", r=4, quantize_residual=True)
    assert hlp.is_quantized(via_flag.model)
    assert torch.equal(_q_proj(via_flag).lora_A["default"].weight, _q_proj(via_config).lora_A["default"].weight)
    assert torch.equal(logits(via_flag.model, batch), logits(via_config.model, batch))
    nf4_base = hlp.attach(make_tiny_model(), "qlora", r=2).model.unload()
    with pytest.raises(hlp.IncompatibleError, match="already 4-bit"):
        hlp.attach(nf4_base, "pissa", r=4)


@pytest.mark.integration
def test_qpissa_svd_in_fp32_then_nf4_residual_trains_and_merges(batch, token_dataset, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    model = make_tiny_model()
    W = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    adapted = hlp.attach(model, "pissa", r=4, quantize_residual=True)
    assert sum(type(m) is bnb.nn.Linear4bit for m in adapted.model.modules()) == 14
    layer = _q_proj(adapted)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # the factors come from the fp32 W
    A = torch.diag(S[:4].sqrt()) @ Vh[:4]
    assert torch.allclose(layer.lora_A["default"].weight, A, atol=1e-5)
    w4 = layer.base_layer.weight
    deq = dequantize_4bit(w4.data, w4.quant_state)
    B0A0 = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    # NF4 rounds W_res, not W: the error vs W is the residual's quantization error only
    assert (deq + B0A0 - W).abs().max() < 0.25 * W.abs().max()
    losses = _train(adapted, tmp_path, token_dataset)
    assert losses[-1] < losses[0] - 0.05
    adapted.model.eval()
    trained = logits(adapted.model, batch)
    result = adapted.export(tmp_path / "out", merge=True)
    assert any("QPiSSA" in n for n in result.notes)
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert not hlp.is_quantized(merged)
    assert (logits(merged, batch) - trained).abs().max() <= 1e-4
