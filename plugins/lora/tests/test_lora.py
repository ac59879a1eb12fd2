"""LoRA through the core: identity at init, merge, save/reload, plain-PEFT portability, errors."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, Trainer

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.testing.helpers import logits, make_tiny_model, plain_peft_logits, rel_err, training_args


def test_identity_at_init(tiny_model, batch):
    ref = logits(tiny_model, batch)
    adapted = hlp.attach(tiny_model, "lora", r=4, lora_alpha=8)
    assert rel_err(logits(adapted.model, batch), ref) <= 1e-6
    names = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    # all-linear: 7 projections x 2 layers, never the output head
    assert len([n for n in names if "lora_A" in n]) == 14 and not any("lm_head" in n for n in names)


@pytest.mark.parametrize("targets,expected", [(["q_proj", "v_proj"], 4), (r".*\.mlp\.(gate|up)_proj", 4)])
def test_target_modules_by_name_and_regex(tiny_model, targets, expected):
    adapted = hlp.attach(tiny_model, "lora", r=2, target_modules=targets)
    assert len([n for n, _ in adapted.model.named_parameters() if "lora_A" in n]) == expected


def test_rslora_scaling(tiny_model):
    adapted = hlp.attach(tiny_model, "lora", r=4, lora_alpha=8, use_rslora=True)
    layer = adapted.model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)


def _train(adapted, tmp_path, dataset, **kw):
    trainer = Trainer(
        model=adapted.model,
        args=training_args(tmp_path / "run", **kw),
        train_dataset=dataset,
        **adapted.trainer_kwargs(),
    )
    trainer.train()
    return trainer


def test_trainer_loss_goes_down_and_merge_is_exact(tiny_model, batch, token_dataset, tmp_path):
    adapted = hlp.attach(tiny_model, "lora", r=4, lora_alpha=8)
    trainer = _train(adapted, tmp_path, token_dataset)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0] - 0.05
    adapted.model.eval()
    trained = logits(adapted.model, batch)
    result = adapted.export(tmp_path / "out", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert (logits(merged, batch) - trained).abs().max() <= 1e-4
    # the adapted model is untouched by export (merge works on a copy)
    assert torch.equal(logits(adapted.model, batch), trained)

    # saved then reloaded equals before saving, and the config comes back as our class
    reloaded = hlp.load_adapter(make_tiny_model(), result.adapter_dir)
    assert type(reloaded.config).__name__ == "LoraMethodConfig" and reloaded.method.name == "lora"
    assert (logits(reloaded.model, batch) - trained).abs().max() <= 1e-6
    # adapter_config.json holds only LoraConfig's fields (plain PEFT loads it silently); ours sit beside it
    assert "hf_lowrank_method" not in json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert json.loads((result.adapter_dir / "hf_lowrank_method.json").read_text())["method"] == "lora"


@pytest.mark.integration
def test_plain_peft_loads_our_adapter_without_our_package(tiny_model, batch, token_dataset, tmp_path):
    base_dir = tmp_path / "base"
    tiny_model.save_pretrained(base_dir)
    adapted = hlp.attach(tiny_model, "lora", r=4)
    _train(adapted, tmp_path, token_dataset, max_steps=4)
    adapted.model.eval()
    expected = logits(adapted.model, batch)
    result = adapted.export(tmp_path / "out")
    plain, config_class = plain_peft_logits(base_dir, result.adapter_dir, batch, tmp_path)
    assert config_class == "LoraConfig"
    assert (plain - expected).abs().max() <= 1e-5


def test_sequence_classification_model(batch):
    from transformers import LlamaForSequenceClassification

    from hf_lowrank_plugins.testing.helpers import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_llama_config(num_labels=3, pad_token_id=0)).eval()
    ref = logits(model, batch)
    adapted = hlp.attach(model, "lora", r=2, target_modules=["q_proj", "v_proj"])
    assert adapted.config.task_type == "SEQ_CLS"
    assert rel_err(logits(adapted.model, batch), ref) <= 1e-6
    assert any("score" in n for n, p in adapted.model.named_parameters() if p.requires_grad)


def test_no_module_matched_names_the_existing_layers(tiny_model):
    with pytest.raises(hlp.TargetError, match="matched no linear layer.*q_proj.*all-linear"):
        hlp.attach(tiny_model, "lora", target_modules=["query"])


def test_rank_too_large(tiny_model):
    with pytest.raises(hlp.ConfigError, match=r"rank r 65 is larger .*k_proj \(32x64\); use rank r <= 32"):
        hlp.attach(tiny_model, "lora", r=65)


def test_attach_twice_is_refused(tiny_model):
    adapted = hlp.attach(tiny_model, "lora", r=2)
    with pytest.raises(hlp.IncompatibleError, match="already carries a PEFT adapter"):
        hlp.attach(adapted.model, "lora", r=2)


def test_attach_by_config_instance(tiny_model):
    from hf_lowrank_lora import LoraMethodConfig

    adapted = hlp.attach(tiny_model, LoraMethodConfig(r=3))
    assert adapted.method.name == "lora" and isinstance(adapted.model, PeftModel)
