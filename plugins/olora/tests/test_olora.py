"""OLoRA: PEFT's initialisation exactly, a base that is refused where PEFT's QR would go wrong, and a plan term."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.testing.models import GPT2, LLAMA


def test_the_initialisation_is_pefts_olora_and_the_output_is_the_base():
    """Factors and residual base equal PEFT's own ``init_lora_weights="olora"`` (<= 1e-6), output equals the base."""
    reference = get_peft_model(
        LLAMA.build(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="olora")
    )
    base = LLAMA.build()
    batch = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = base(batch).logits
    ours = hlp.attach(base, "olora", r=4, lora_alpha=8).model
    theirs = dict(reference.named_parameters())
    compared = 0
    for name, param in ours.named_parameters():
        assert (param.detach() - theirs[name].detach()).abs().max() <= 1e-6, name
        compared += "lora_" in name
    assert compared == 2 * 7 * 2  # A and B of 7 projections in each of the 2 layers
    with torch.no_grad():
        assert (ours(batch).logits - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_a_transposed_weight_is_refused_naming_the_layer():
    with pytest.raises(hlp.IncompatibleError, match=r"store their weight transposed .*Conv1D, e.g. 'transformer"):
        hlp.attach(GPT2.build(), "olora", r=4)


def test_a_4bit_base_is_refused_before_attaching():
    with pytest.raises(
        hlp.IncompatibleError, match=r"method 'olora' cannot train on a quantized \(4-bit\) base: OLoRA decomposes"
    ):
        hlp.attach(LLAMA.build(), "olora", r=4, load_in_4bit=True)


def test_plan_counts_the_fp32_qr_of_the_largest_target():
    from hf_lowrank_plugins.plan import plan_memory
    from hf_lowrank_plugins.testing.helpers import tiny_llama_config

    config = tiny_llama_config()
    plan = plan_memory(config, "olora", hlp.PlanSettings(dtype=torch.float32), r=4)
    largest = config.hidden_size * config.intermediate_size
    assert plan.terms["olora_qr"] == 3 * largest * 4
