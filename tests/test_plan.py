"""``hf-lowrank plan``: predicted memory from a config on the meta device, exact parameter counts,
method terms from the plugins' ``plan_memory`` hook, ZeRO splits, and the CLI (text, JSON, bad input)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.plan import NF4_BYTES_PER_WEIGHT, plan_memory
from hf_lowrank_plugins.testing.helpers import make_tiny_model, tiny_llama_config
from hf_lowrank_plugins.types import PlanSettings

LLAMA_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
SETTINGS = {
    "lora": {"r": 4},
    "dora": {"r": 4},
    "pissa": {"r": 4},
    "lora_ga": {"r": 4},
    "salor": {"r": 4},
    "galore": {"rank": 8},
    "full": {},
}


@pytest.mark.parametrize("method", list(SETTINGS))
def test_trainable_parameters_and_weights_are_exact(method):
    """The meta-device plan counts exactly the parameters ``attach`` trains, and ``weights`` is exactly
    the bytes of the adapted model's parameters (fp32 tiny Llama)."""
    plan = plan_memory(tiny_llama_config(), method, PlanSettings(dtype=torch.float32), **SETTINGS[method])
    adapted = hlp.attach(make_tiny_model(), method, **SETTINGS[method])
    trainable = sum(p.numel() for p in adapted.model.parameters() if p.requires_grad)
    params = {id(p): p for p in adapted.model.parameters()}.values()
    assert plan.trainable_params == trainable
    assert plan.terms["weights"] == sum(p.numel() * p.element_size() for p in params)
    assert plan.terms["gradients"] == 4 * trainable
    if method != "galore":
        assert plan.terms["optimizer"] == 8 * trainable  # AdamW: two fp32 moments


def test_method_terms_come_from_the_plugins():
    config = tiny_llama_config()
    settings = PlanSettings(dtype=torch.float32)
    full = plan_memory(config, "full", settings)
    galore = plan_memory(config, "galore", settings, rank=8)
    layerwise = plan_memory(config, "galore", settings, rank=8, layerwise=True)
    assert galore.terms["optimizer"] < full.terms["optimizer"] and galore.terms["galore_projectors"] > 0
    assert layerwise.terms["gradients"] < galore.terms["gradients"]
    assert plan_memory(config, "dora", settings, r=4).terms["dora_activations"] > 0
    assert plan_memory(config, "lora_ga", settings, r=4).terms["lora_ga_init"] > 0
    sparse = plan_memory(config, "salor", settings, r=4, sparsity_target="both", adapter_sparsity=0.5)
    assert sparse.terms["salor_adapter_masks"] == sparse.trainable_params  # one byte per factor entry
    assert "dora_activations" not in plan_memory(config, "lora", settings, r=4).terms


def test_weights_trained_in_bf16_are_planned_in_bf16():
    """`--dtype bfloat16` with `full` trains bf16 weights, gradients and AdamW moments: the plan counted fp32.
    Adapters train in fp32 whatever the base's dtype."""
    config = tiny_llama_config()
    fp32, bf16 = (plan_memory(config, "full", PlanSettings(dtype=d)) for d in (torch.float32, torch.bfloat16))
    for term in ("weights", "gradients", "optimizer"):
        assert bf16.terms[term] * 2 == fp32.terms[term], term
    lora32, lora16 = (plan_memory(config, "lora", PlanSettings(dtype=d), r=4) for d in (torch.float32, torch.bfloat16))
    assert lora16.terms["gradients"] == lora32.terms["gradients"] == 4 * lora32.trainable_params


def test_zero_stages_split_state_over_processes():
    config = tiny_llama_config()
    one = plan_memory(config, "full", PlanSettings(dtype=torch.float32))
    for stage, split in {
        1: {"optimizer"},
        2: {"optimizer", "gradients"},
        3: {"optimizer", "gradients", "weights"},
    }.items():
        four = plan_memory(config, "full", PlanSettings(dtype=torch.float32, world_size=4, zero_stage=stage))
        for term in ("weights", "gradients", "optimizer"):
            expected = one.terms[term] // 4 if term in split else one.terms[term]
            assert abs(four.terms[term] - expected) <= 4, (stage, term)


def test_a_method_refused_under_a_zero_stage_is_refused_by_the_plan_too():
    config = tiny_llama_config()
    limited = dataclasses.replace(
        hlp.get_registry().get("lora"), max_zero_stage=1, zero_reason="it needs whole weights"
    )
    with pytest.raises(hlp.IncompatibleError, match="'lora' cannot train under DeepSpeed ZeRO-2: it needs whole"):
        plan_memory(config, limited, PlanSettings(world_size=2, zero_stage=2))
    assert plan_memory(config, limited, PlanSettings(world_size=2, zero_stage=1), r=4).total > 0
    assert plan_memory(config, "galore", PlanSettings(world_size=2, zero_stage=3), rank=4).total > 0
    alone = plan_memory(config, "galore", PlanSettings(), rank=4)
    zero2 = plan_memory(config, "galore", PlanSettings(world_size=2, zero_stage=2), rank=4)
    assert abs(zero2.terms["optimizer"] - alone.terms["optimizer"] // 2) <= 8
    assert zero2.terms["galore_zero_gather"] > 0 and "galore_zero_gather" not in alone.terms
    assert plan_memory(config, "lora_ga", PlanSettings(world_size=2, zero_stage=3), r=4).total > 0


@pytest.mark.integration
def test_a_70b_config_is_planned_without_its_weights(tmp_path):
    """Llama-3.1-70B's config: exact LoRA parameter count, NF4 weights, in a process that never holds
    more than a few hundred MiB beyond the libraries."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    code = (
        "import json, resource, sys\n"
        "from hf_lowrank_plugins.plan import plan_memory\nfrom hf_lowrank_plugins.types import PlanSettings\n"
        "s = PlanSettings(batch_size=1, seq_len=2048, gradient_checkpointing=True, load_in_4bit=True, device='cuda')\n"
        f"p = plan_memory({str(tmp_path)!r}, 'qlora', s, r=16)\n"
        "print(json.dumps({**p.as_dict(), 'maxrss_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    per_layer = 16 * (2 * (8192 + 8192) + 2 * (8192 + 1024) + 3 * (8192 + 28672))
    assert plan["trainable_params"] == 80 * per_layer == 207_093_760
    linear = 80 * (2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 8192 * 28672)
    embeddings = 2 * 128256 * 8192  # input and output, fp32 after PEFT's k-bit preparation
    norms = (2 * 80 + 1) * 8192
    expected = linear * NF4_BYTES_PER_WEIGHT + (embeddings + norms) * 4 + 4 * plan["trainable_params"]
    assert abs(plan["terms_bytes"]["weights"] - expected) <= 1e-6 * expected
    assert plan["maxrss_kib"] < 2 * 2**20  # the 70B model itself would be 35 GiB even in NF4


def test_cli_plan_text_json_and_bad_input(tmp_path, capsys):
    from hf_lowrank_plugins.app.cli import main

    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_70B, "num_hidden_layers": 2}))
    assert main(["plan", str(tmp_path), "--method", "lora", "--rank", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["method"] == "lora" and plan["total_bytes"] == sum(plan["terms_bytes"].values())
    assert main(["plan", str(tmp_path / "config.json"), "--method", "galore", "--set", "rank=64"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("galore: ") and "galore_projectors" in out
    assert main(["plan", str(tmp_path / "nothing"), "--method", "lora"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0]
    assert main(["plan", str(tmp_path), "--method", "galore", "--load-in-4bit"]) == 2
    assert "4-bit" in capsys.readouterr().err


def test_plan_refuses_bad_configs_and_targets_in_one_line(tmp_path, capsys):
    """They were internal errors (exit 1, a traceback's last line)."""
    from transformers import T5Config

    from hf_lowrank_plugins.app.cli import main

    (tmp_path / "broken.json").write_text('{"num_hidden_layers": 2')
    (tmp_path / "untyped.json").write_text('{"hidden_size": 8}')
    T5Config(d_model=64, num_layers=2, vocab_size=128).save_pretrained(str(tmp_path / "t5"))
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({**LLAMA_70B, "num_hidden_layers": 2}))
    cases = {
        "broken.json": ([], "is not valid JSON"),
        "untyped.json": ([], "names no model_type"),
        "t5": ([], "a t5 config has no causal language model class"),
        "llama": (["--set", "target_modules=q_proj"], r"matched no linear layer .*'\.\*q_proj' or a list \['q_proj'\]"),
    }
    for source, (extra, message) in cases.items():
        assert main(["plan", str(tmp_path / source), "--method", "lora", *extra]) == 2, source
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(message, err[0]), (source, err)


def test_plan_defaults_are_trains(tmp_path, capsys):
    """plan's batch size and sequence length defaulted to 2 x 64 where train's are 8 x 128: the default plan
    described another run."""
    from hf_lowrank_plugins.app.cli import main
    from hf_lowrank_plugins.app.spec import TrainSpec

    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_70B, "num_hidden_layers": 2}))
    train = TrainSpec(method="lora")
    plans = []
    for size in ([], ["--batch-size", str(train.batch_size), "--seq-len", str(train.seq_len)]):
        assert main(["plan", str(tmp_path), "--method", "lora", "--json", *size]) == 0
        terms = json.loads(capsys.readouterr().out)["terms_bytes"]
        plans.append({k: v for k, v in terms.items() if k != "runtime"})  # this process's own, measured
    assert plans[0] == plans[1]
