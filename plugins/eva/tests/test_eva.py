"""EVA: PEFT's initialisation exactly, on the Trainer's own optimizer, resumable, and refused where PEFT's EVA fails."""

from __future__ import annotations

import pytest
import torch
from peft import EvaConfig, LoraConfig, get_peft_model
from peft.tuners.lora.eva import initialize_lora_eva_weights
from transformers import Trainer

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.testing.helpers import TokenDataset, training_args
from hf_lowrank_plugins.testing.models import BERT_CLS, LLAMA, T5


def _batches(count: int = 6, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Causal-LM batches whose first 8 positions are a prompt (labels -100), as the CLI's chat data are."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 128, (4, 32), generator=generator)
        labels = ids.clone()
        labels[:, :8] = -100
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def test_the_initialisation_is_pefts_eva_and_the_optimizer_trains_the_new_layers():
    """A, the redistributed ranks and the adjusted alphas equal PEFT's own ``initialize_lora_eva_weights`` on
    the same batches (exactly: the same code on the same inputs); the layers re-created at new ranks replace
    the old ones in the optimizer, which then holds exactly the model's trainable parameters."""
    data = _batches()
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="eva", eva_config=EvaConfig())
    reference = get_peft_model(LLAMA.build(), config)
    initialize_lora_eva_weights(reference, dataloader=data, show_progress_bar=False)
    adapted = hlp.attach(LLAMA.build(), "eva", r=4, lora_alpha=8)
    optimizer = torch.optim.AdamW(_trainable(adapted.model))
    assert adapted.begin_training(data, optimizer)

    ours, theirs = adapted.model.peft_config["default"], reference.peft_config["default"]
    assert ours.rank_pattern == theirs.rank_pattern and ours.alpha_pattern == theirs.alpha_pattern
    assert len(set(ours.rank_pattern.values())) > 1  # ranks did move: the re-created layers are exercised
    expected = dict(reference.named_parameters())
    assert {n for n, _ in adapted.model.named_parameters()} == set(expected)
    for name, param in adapted.model.named_parameters():
        assert torch.equal(param, expected[name]), name
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in _trainable(adapted.model)}
    batch = LLAMA.batch()
    with torch.no_grad():  # B = 0: still the base's output
        assert torch.equal(adapted.model(**batch).logits, reference(**batch).logits)


def test_training_after_the_initialisation_moves_every_adapter_weight(tmp_path):
    """Through the Trainer (the hook at on_train_begin, on the Trainer's dataloader): every B leaves zero."""
    adapted = hlp.attach(LLAMA.build(), "eva", r=4)
    args = training_args(tmp_path, max_steps=3)
    Trainer(model=adapted.model, args=args, train_dataset=TokenDataset(), **adapted.trainer_kwargs()).train()
    lora_b = [p for n, p in adapted.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(bool(p.detach().abs().sum() > 0) for p in lora_b)


def test_a_resumed_run_re_creates_the_saved_ranks_before_loading(tmp_path):
    adapted = hlp.attach(LLAMA.build(), "eva", r=4)
    args = training_args(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2)
    Trainer(model=adapted.model, args=args, train_dataset=TokenDataset(), **adapted.trainer_kwargs()).train()
    saved = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if p.requires_grad}
    again = hlp.attach(LLAMA.build(), "eva", r=4)
    args = training_args(tmp_path / "again", max_steps=2)
    trainer = Trainer(model=again.model, args=args, train_dataset=TokenDataset(), **again.trainer_kwargs())
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))  # nothing left to train
    restored = {n: p.detach() for n, p in again.model.named_parameters() if p.requires_grad}
    assert restored.keys() == saved.keys()
    assert all(torch.equal(restored[n], saved[n]) for n in saved)


def test_data_that_cannot_converge_stops_at_the_cap_with_the_remedy():
    adapted = hlp.attach(LLAMA.build(), "eva", r=4, tau=1.0, svd_max_batches=3)
    optimizer = torch.optim.AdamW(_trainable(adapted.model))
    with pytest.raises(hlp.ConfigError, match=r"did not converge within 3 batches .*lower tau, raise svd_max_batches"):
        adapted.begin_training(_batches(2), optimizer)


def test_a_classifier_pooler_with_too_few_rows_is_named_and_can_be_left_out():
    """The pooler sees one row per sequence: 4 rows cannot feed r * rho = 8 components."""
    batch = BERT_CLS.batch()
    rows = batch["input_ids"].shape[0]
    adapted = hlp.attach(BERT_CLS.build(), "eva", r=rows, svd_max_batches=4)
    with pytest.raises(
        hlp.ConfigError, match=r"never started on 1 layer\(s\) \(e.g. '.*pooler.dense'\).*exclude_modules"
    ):
        adapted.begin_training([batch], torch.optim.AdamW(_trainable(adapted.model)))


def test_an_encoder_decoder_is_refused_at_attach():
    with pytest.raises(hlp.IncompatibleError, match=r"encoder-decoder model \(T5\) is not supported"):
        hlp.attach(T5.build(), "eva", r=4)


def test_plan_counts_the_svd_state_and_the_redistribution_bound():
    from hf_lowrank_plugins.plan import plan_memory
    from hf_lowrank_plugins.testing.helpers import tiny_llama_config

    config = tiny_llama_config()
    settings = hlp.PlanSettings(dtype=torch.float32)
    plan = plan_memory(config, "eva", settings, r=4)
    flat = plan_memory(config, "eva", settings, r=4, rho=1.0)
    assert plan.terms["eva_svd"] > flat.terms["eva_svd"] > 0  # 8 components per layer against 4
    assert plan.terms["eva_ranks"] > 0 and flat.terms["eva_ranks"] == 0


def test_on_a_4bit_base_the_svd_sees_the_quantized_layers_inputs():
    """QLoRA + EVA: the layers re-created at their ranks keep fp32 factors, and B = 0 keeps the 4-bit output."""
    adapted = hlp.attach(LLAMA.build(), "eva", r=4, load_in_4bit=True)
    assert hlp.is_quantized(adapted.model)
    batch = LLAMA.batch()
    with torch.no_grad():
        before = adapted.model(**batch).logits
    assert adapted.begin_training(_batches(), torch.optim.AdamW(_trainable(adapted.model)))
    with torch.no_grad():
        assert torch.equal(adapted.model(**batch).logits, before)
    assert len(set(adapted.model.peft_config["default"].rank_pattern.values())) > 1
    assert {p.dtype for p in _trainable(adapted.model)} == {torch.float32}
