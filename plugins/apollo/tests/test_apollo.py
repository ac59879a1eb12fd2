"""APOLLO: the official package's update through the Trainer, a state the Trainer can resume from, a plan term."""

from __future__ import annotations

import io

import pytest
import torch
from apollo_torch import APOLLOAdamW
from transformers import Trainer

import hf_lowrank_plugins as hlp
from hf_lowrank_apollo import ResumableApolloAdamW
from hf_lowrank_plugins.testing.helpers import TokenDataset, training_args
from hf_lowrank_plugins.testing.models import LLAMA

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 10


def _args(tmp_path, **overrides):
    # transformers' apollo_adamw gives the weights it does not project the package's defaults (eps 1e-6, no
    # weight decay) rather than the arguments', so the comparison runs where those agree
    return training_args(
        tmp_path, max_steps=STEPS, gradient_accumulation_steps=2, warmup_steps=2, adam_epsilon=1e-6, **overrides
    )


def _state_tensor_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            values = [value] + ([value.ortho_matrix] if hasattr(value, "ortho_matrix") else [])
            total += sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total


@pytest.mark.parametrize(
    "method, settings, optim_args",
    [
        ("apollo", {"rank": 4}, "rank=4,proj=random,scale_type=channel,scale=1.0,update_proj_gap=3"),
        ("apollo_mini", {}, "rank=1,proj=random,scale_type=tensor,scale=128,update_proj_gap=3"),
    ],
)
def test_ten_trainer_steps_equal_transformers_apollo_on_the_official_package(tmp_path, method, settings, optim_args):
    """10 steps (accumulation 2, warm-up, projection refreshes at steps 0, 3, 6, 9) end bit-identical to
    transformers' ``optim="apollo_adamw"``, which builds the package's optimizer."""
    adapted = hlp.attach(LLAMA.build(), method, target_modules=TARGETS, update_proj_gap=3, **settings)
    ours = Trainer(
        model=adapted.model, args=_args(tmp_path / "ours"), train_dataset=TokenDataset(), **adapted.trainer_kwargs()
    )
    ours.train()
    assert type(ours.optimizer.optimizer) is ResumableApolloAdamW
    reference = LLAMA.build()
    args = _args(tmp_path / "hf", optim="apollo_adamw", optim_target_modules=TARGETS, optim_args=optim_args)
    theirs = Trainer(model=reference, args=args, train_dataset=TokenDataset())
    theirs.train()
    assert type(theirs.optimizer.optimizer) is APOLLOAdamW
    expected = dict(reference.named_parameters())
    for name, param in adapted.model.named_parameters():
        assert torch.equal(param, expected[name]), name


def test_the_state_dict_survives_the_trainers_safe_load_where_the_packages_does_not():
    """The Trainer reads optimizer.pt with torch.load(weights_only=True): the package's projector objects
    are refused there (so transformers' apollo_adamw cannot resume); ours load back and step identically."""
    model = LLAMA.build()
    groups = [
        {
            "params": [model.model.layers[0].mlp.up_proj.weight],
            "rank": 2,
            "proj": "random",
            "scale_type": "channel",
            "scale": 1.0,
            "update_proj_gap": 2,
            "proj_type": "std",
        }
    ]
    batch = LLAMA.batch()
    batch = {**batch, "labels": batch["input_ids"]}

    def step(optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()

    official, ours = APOLLOAdamW(groups, lr=1e-3), ResumableApolloAdamW(groups, lr=1e-3)
    step(official)
    step(ours)
    for optimizer, loads in ((official, False), (ours, True)):
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        buffer.seek(0)
        if not loads:
            with pytest.raises(Exception, match="weights_only"):
                torch.load(buffer, weights_only=True)
            continue
        restored = ResumableApolloAdamW(groups, lr=1e-3)
        restored.load_state_dict(torch.load(buffer, weights_only=True))
        weight = model.model.layers[0].mlp.up_proj.weight
        before = weight.detach().clone()
        step(ours)
        after_ours = weight.detach().clone()
        weight.data.copy_(before)
        step(restored)
        assert torch.equal(weight, after_ours)


def test_the_plan_predicts_the_optimizer_state_measured_after_training(tmp_path):
    from hf_lowrank_plugins.plan import plan_memory
    from hf_lowrank_plugins.testing.helpers import tiny_llama_config

    adapted = hlp.attach(LLAMA.build(), "apollo", rank=4)
    trainer = Trainer(
        model=adapted.model,
        args=training_args(tmp_path, max_steps=2),
        train_dataset=TokenDataset(),
        **adapted.trainer_kwargs(),
    )
    trainer.train()
    measured = _state_tensor_bytes(trainer.optimizer.optimizer)
    plan = plan_memory(tiny_llama_config(), "apollo", hlp.PlanSettings(dtype=torch.float32), rank=4)
    assert plan.terms["optimizer"] + plan.terms["apollo_projectors"] == measured
    adamw = sum(2 * p.numel() * 4 for p in adapted.model.parameters())
    assert plan.terms["optimizer"] < adamw


@pytest.mark.parametrize("method, settings", [("apollo", {"rank": 4}), ("apollo_mini", {})])
@pytest.mark.integration
def test_layerwise_updates_equal_the_global_step_and_resume(tmp_path, method, settings):
    """Layer-wise (each projected weight updated from its gradient hook, the gradient then freed) ends
    bit-identical to the global step over 10 steps with projection refreshes, and a run resumed from its
    step-4 checkpoint ends where the whole run does."""

    def run(name, layerwise, resume=None):
        adapted = hlp.attach(
            LLAMA.build(), method, target_modules=TARGETS, update_proj_gap=3, layerwise=layerwise, **settings
        )
        args = training_args(
            tmp_path / name, max_steps=STEPS, warmup_steps=2, max_grad_norm=0.0, save_strategy="steps", save_steps=4
        )
        trainer = Trainer(model=adapted.model, args=args, train_dataset=TokenDataset(), **adapted.trainer_kwargs())
        trainer.train(resume_from_checkpoint=resume)
        return trainer, dict(adapted.model.named_parameters())

    global_trainer, global_weights = run("global", layerwise=False)
    layerwise_trainer, layerwise_weights = run("layerwise", layerwise=True)
    assert layerwise_trainer.optimizer.optimizer.layerwise
    for name, param in layerwise_weights.items():
        assert torch.equal(param, global_weights[name]), name
    _, resumed_weights = run("layerwise", layerwise=True, resume=str(tmp_path / "layerwise" / "checkpoint-4"))
    for name, param in resumed_weights.items():
        assert torch.equal(param, layerwise_weights[name]), name


def test_layerwise_refuses_what_it_cannot_honour(tmp_path):
    adapted = hlp.attach(LLAMA.build(), "apollo", rank=4, target_modules=TARGETS, layerwise=True)
    args = training_args(tmp_path, max_steps=2, gradient_accumulation_steps=2)
    trainer = Trainer(model=adapted.model, args=args, train_dataset=TokenDataset(), **adapted.trainer_kwargs())
    with pytest.raises(hlp.ConfigError, match="use gradient_accumulation_steps=1 or layerwise=False"):
        trainer.train()
