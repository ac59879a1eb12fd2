"""Adam-mini: the official package's update through the Trainer, its state against AdamW's, and its plan term."""

from __future__ import annotations

import pytest
import torch
from adam_mini import Adam_mini
from transformers import Trainer

import hf_lowrank_plugins as hlp
from hf_lowrank_adam_mini import state_bytes
from hf_lowrank_adam_mini.optimizer import adamw_state_bytes
from hf_lowrank_plugins.testing.helpers import TokenDataset, training_args
from hf_lowrank_plugins.testing.models import LLAMA

STEPS = 10


def _train(model: torch.nn.Module, tmp_path, **trainer_kwargs) -> Trainer:
    args = training_args(tmp_path, max_steps=STEPS, weight_decay=0.1, gradient_accumulation_steps=2, warmup_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), **trainer_kwargs)
    trainer.train()
    return trainer


def test_ten_trainer_steps_equal_the_official_package_built_by_hand(tmp_path):
    """The plugin's optimizer is the package's with the Trainer's lr, betas, eps and weight decay and the
    model's heads (GQA: 4 query, 2 key/value heads): 10 steps with accumulation and a warm-up schedule
    end bit-identical to a Trainer given ``Adam_mini`` built as the package's README shows."""
    adapted = hlp.attach(LLAMA.build(), "adam_mini")
    ours = _train(adapted.model, tmp_path / "ours", **adapted.trainer_kwargs())
    reference = LLAMA.build()
    config = reference.config
    args = ours.args
    official = Adam_mini(
        reference.named_parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
        dim=config.hidden_size,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_key_value_heads,
        verbose=False,
    )
    _train(reference, tmp_path / "official", optimizers=(official, None))
    expected = dict(reference.named_parameters())
    moved = 0
    for name, param in adapted.model.named_parameters():
        assert torch.equal(param, expected[name]), name
        moved += not torch.equal(param, dict(LLAMA.build().named_parameters())[name])
    assert moved == len(expected)  # every weight trained
    assert type(ours.optimizer.optimizer).__name__ == "Adam_mini"


def test_the_state_is_half_of_adamws_and_the_plan_predicts_it_exactly(tmp_path):
    adapted = hlp.attach(LLAMA.build(), "adam_mini")
    trainer = _train(adapted.model, tmp_path, **adapted.trainer_kwargs())
    optimizer = trainer.optimizer.optimizer
    measured = sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
    assert measured == state_bytes(optimizer)
    adamw = adamw_state_bytes(adapted.model)
    assert 0.5 < measured / adamw < 0.52  # m per weight, v per block

    from hf_lowrank_plugins.plan import plan_memory
    from hf_lowrank_plugins.testing.helpers import tiny_llama_config

    plan = plan_memory(tiny_llama_config(), "adam_mini", hlp.PlanSettings(dtype=torch.float32))
    assert plan.terms["optimizer"] == measured


def test_head_geometry_comes_from_the_model_config_or_the_settings():
    from types import SimpleNamespace

    from hf_lowrank_adam_mini import AdamMiniConfig
    from hf_lowrank_adam_mini.optimizer import geometry

    unnamed = SimpleNamespace(config=SimpleNamespace())
    with pytest.raises(hlp.ConfigError, match=r"--set hidden_size=N --set num_attention_heads=N"):
        geometry(unnamed, AdamMiniConfig())
    assert geometry(unnamed, AdamMiniConfig(hidden_size=64, num_attention_heads=4)) == {
        "dim": 64,
        "n_heads": 4,
        "n_kv_heads": 4,
        "head_dim": 16,
    }
    assert geometry(LLAMA.build(), AdamMiniConfig())["n_kv_heads"] == 2
    with pytest.raises(hlp.ConfigError, match=r"query heads \(4\) to be a multiple of the key/value heads \(3\)"):
        geometry(unnamed, AdamMiniConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3))
