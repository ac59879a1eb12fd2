"""CorDA: PEFT's decomposition exactly, from the Trainer's batches at train start, and refused where PEFT's hook
would estimate wrongly."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.testing.models import BERT_CLS, LLAMA, T5

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batches(count: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 128, (4, 32), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return batches


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_the_initialisation_is_pefts_corda_and_the_output_is_the_base(mode):
    """A, B and the residual base equal PEFT's own ``preprocess_corda`` + ``init_lora_weights="corda"`` fed the
    same sequences one at a time (as PEFT's recipe runs its calibration), to within 1e-6; output as the base's."""
    data = _batches()
    reference = LLAMA.build()
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=mode),
    )

    def run_model() -> None:
        for batch in data:
            for row in batch["input_ids"]:
                reference(input_ids=row[None])

    preprocess_corda(reference, config, run_model=run_model)
    reference = get_peft_model(reference, config)
    adapted = hlp.attach(LLAMA.build(), "corda", r=4, lora_alpha=8, corda_method=mode, calibration_batches=4)
    batch = LLAMA.batch()
    with torch.no_grad():
        before = adapted.model(**batch).logits
    assert adapted.begin_training(data)
    theirs = dict(reference.named_parameters())
    compared = 0
    for name, param in adapted.model.named_parameters():
        scale = theirs[name].detach().abs().max().clamp_min(1e-12)
        assert (param.detach() - theirs[name].detach()).abs().max() <= 1e-6 * scale, name
        compared += "lora_" in name
    assert compared == 2 * 7 * 2
    with torch.no_grad():
        after = adapted.model(**batch).logits
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()


def test_padding_is_left_out_of_the_covariance():
    """A batch padded to 32 tokens decomposes as its unpadded sequences do."""
    data = _batches(1)
    padded = {k: v.clone() for k, v in data[0].items()}
    padded["attention_mask"][:, 24:] = 0
    padded["input_ids"][:, 24:] = 0
    trimmed = {k: v[:, :24] for k, v in data[0].items()}
    results = []
    for batch in (padded, trimmed):
        adapted = hlp.attach(LLAMA.build(), "corda", r=4, calibration_batches=1)
        adapted.begin_training([batch])
        results.append({n: p.detach().clone() for n, p in adapted.model.named_parameters() if "lora_A" in n})
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


@pytest.mark.parametrize("case, task", [(BERT_CLS, "SEQ_CLS"), (T5, "SEQ_2_SEQ_LM")])
def test_models_other_than_causal_lms_are_refused_with_the_reason(case, task):
    with pytest.raises(hlp.IncompatibleError, match=rf"CorDA on a {task} model is not supported: PEFT's covariance"):
        hlp.attach(case.build(), "corda", r=4)


def test_a_4bit_base_is_refused_before_attaching():
    with pytest.raises(hlp.IncompatibleError, match=r"cannot train on a quantized \(4-bit\) base: CorDA decomposes"):
        hlp.attach(LLAMA.build(), "corda", r=4, load_in_4bit=True)


def test_plan_counts_every_covariance_and_one_decomposition():
    from hf_lowrank_plugins.plan import plan_memory
    from hf_lowrank_plugins.testing.helpers import tiny_llama_config

    config = tiny_llama_config()
    plan = plan_memory(config, "corda", hlp.PlanSettings(dtype=torch.float32), r=4)
    width, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    covariances = layers * (6 * width * width + inner * inner) * 4  # q, k, v, o, gate, up read width; down inner
    assert plan.terms["corda_covariance"] == covariances + 3 * width * inner * 4
