"""Every ``init_lora_weights`` value PEFT 0.21 accepts either exports portably or is refused at attach.

Portable means: the saved adapter on the *original* base is the trained model wherever it is
loaded. An init that rewrites the base (OLoRA, PiSSA, CorDA, LoftQ) breaks that silently: PEFT
re-runs the rewrite when it loads, so plain PEFT agrees with ``merged/`` while ``hf-lowrank merge``,
vLLM or any loader that reads the tensors as they are gets another model.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.app.cli import main
from hf_lowrank_plugins.testing import LLAMA, output, rel_err, with_saved_tensors

#: every value PEFT 0.21's LoraConfig documents for init_lora_weights
PEFT_INITS = [True, False, "gaussian", "orthogonal", "mica", "olora", "pissa", "pissa_niter_4", "corda", "eva"]
PEFT_INITS += ["loftq", "lora_ga"]

#: per LoRA-family method, the values it trains and exports portably; every other value is refused
PORTABLE = {
    "lora": (True, False, "gaussian", "orthogonal", "mica"),
    "dora": (True, False, "gaussian", "orthogonal"),  # PEFT refuses MiCA's variant beside DoRA's
    "qlora": (True, False, "gaussian"),  # orthogonal and MiCA read the base as floats, a 4-bit base is not
    "salor": (True, False, "gaussian"),  # SALOR's repair sets the factors after pruning
    "pissa": (True, "pissa"),  # the init comes from svd; its export is a plain LoRA on the original weights
    "lora_ga": (True, "lora_ga"),  # the gradient init replaces A and B after attach
}


@pytest.mark.parametrize("method", list(PORTABLE))
@pytest.mark.parametrize("init", PEFT_INITS, ids=str)
def test_each_peft_init_is_accepted_or_refused_by_name(method, init):
    if init in PORTABLE[method] and isinstance(init, (bool, str)):
        assert hlp.make_config(method, init_lora_weights=init).init_lora_weights in (True, False, init, "pissa")
    else:
        with pytest.raises(hlp.ConfigError, match=f"init_lora_weights={init!r}"):
            hlp.make_config(method, init_lora_weights=init)


def test_orthogonal_needs_an_even_rank():
    with pytest.raises(hlp.ConfigError, match="'orthogonal' needs even ranks, got r=3; use an even rank"):
        hlp.make_config("lora", r=3, init_lora_weights="orthogonal")
    with pytest.raises(hlp.ConfigError, match="got r=5"):
        hlp.make_config("lora", r=4, rank_pattern={"q_proj": 5}, init_lora_weights="orthogonal")


@pytest.mark.parametrize("init", ["bogus", 1, 0.5, None])
def test_a_value_that_is_no_init_is_refused_with_the_choices(init):
    with pytest.raises(hlp.ConfigError, match=r"is not an initialisation; use one of True, False, 'gaussian'"):
        hlp.make_config("lora", init_lora_weights=init)


@pytest.mark.parametrize("method, init", [*[("lora", v) for v in PORTABLE["lora"]], ("dora", "orthogonal")], ids=str)
def test_an_allowed_init_merges_from_disk_to_merged_and_loads_anywhere(method, init, tmp_path):
    """``hf-lowrank merge`` of the adapter equals ``merged/`` (<= 1e-5), and the saved tensors on the original
    base with no init re-run, plain PEFT and ``load_adapter`` all equal the trained model."""
    torch.manual_seed(0)
    LLAMA.build().save_pretrained(tmp_path / "base")

    def base():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()

    adapted = hlp.attach(base(), method, r=4, init_lora_weights=init)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapted.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    adapted.model.eval()
    batch = LLAMA.batch()
    trained = output(adapted.model, batch)
    result = adapted.export(tmp_path / "run", merge=True)
    assert result.adapter_dir is not None and result.merged_dir is not None
    merged_dir = tmp_path / "from_disk"
    assert (
        main(["merge", str(result.adapter_dir), "--base", str(tmp_path / "base"), "--output-dir", str(merged_dir)]) == 0
    )
    exported_merge = output(AutoModelForCausalLM.from_pretrained(result.merged_dir).eval(), batch)
    disk_merge = output(AutoModelForCausalLM.from_pretrained(merged_dir).eval(), batch)
    assert rel_err(disk_merge, exported_merge) <= 1e-5
    assert rel_err(exported_merge, trained) <= 1e-5
    assert rel_err(output(with_saved_tensors(base(), result.adapter_dir), batch), trained) <= 1e-5
    assert rel_err(output(PeftModel.from_pretrained(base(), result.adapter_dir).eval(), batch), trained) <= 1e-5
    assert rel_err(output(hlp.load_adapter(base(), result.adapter_dir).model.eval(), batch), trained) <= 1e-5


def test_the_saved_tensors_check_sees_a_base_rewriting_init_that_plain_peft_hides(tmp_path):
    """The kit's ``saved_tensors`` check on plain PEFT's OLoRA: PEFT's own reload re-runs the rewrite and
    agrees, the tensors on the original base do not: what made OLoRA a silently other model."""
    torch.manual_seed(0)
    LLAMA.build().save_pretrained(tmp_path / "base")

    def base():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()

    model = get_peft_model(base(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights="olora"))
    model.eval()
    batch = LLAMA.batch()
    trained = output(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    assert rel_err(output(PeftModel.from_pretrained(base(), tmp_path / "adapter").eval(), batch), trained) <= 1e-5
    assert rel_err(output(with_saved_tensors(base(), tmp_path / "adapter"), batch), trained) > 1e-2
