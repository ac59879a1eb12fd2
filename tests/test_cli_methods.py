"""Method options through the application: `--set` reaches each plugin's config, and maths on the real SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hf_lowrank_plugins.app.cli import main
from hf_lowrank_plugins.testing.helpers import logits, rel_err

pytestmark = pytest.mark.integration  # end to end: left out of `make test-fast`


def test_cli_set_reaches_the_lora_ga_config(tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "run"
    argv = [
        "train",
        "--method",
        "lora_ga",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(text_file),
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--eval-blocks",
        "2",
        "--set",
        "direction=ArBr",
        "--set",
        "ga_batches=2",
        "--set",
        "estimator=sketch",
        "--set",
        "ga_batch_size=1",
    ]
    assert main(argv) == 0
    saved = json.loads((out / "metrics.json").read_text())["config"]
    assert (saved["direction"], saved["ga_batches"], saved["estimator"], saved["ga_batch_size"]) == (
        "ArBr",
        2,
        "sketch",
        1,
    )
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 2 * saved["r"]


def test_cli_set_reaches_every_salor_field(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "data.txt"
    data.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(120)))
    out = tmp_path / "run"
    argv = [
        "train",
        "--method",
        "salor",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(data),
        "--output-dir",
        str(out),
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--seq-len",
        "16",
        "--lr",
        "5e-3",
        "--eval-blocks",
        "4",
        "--rank",
        "4",
        "--set",
        "sparsity=0.25",
        "--set",
        "sparsity_pattern=global",
        "--set",
        "sparsity_target=both",
        "--set",
        "adapter_sparsity=0.5",
        "--set",
        "svd=fast",
        "--set",
        "svd_niter=2",
        "--set",
        "fuse=false",
    ]
    assert main(argv) == 0
    cfg = json.loads((out / "metrics.json").read_text())["config"]
    assert (cfg["sparsity"], cfg["sparsity_pattern"], cfg["sparsity_target"], cfg["adapter_sparsity"]) == (
        0.25,
        "global",
        "both",
        0.5,
    )
    assert (cfg["svd"], cfg["svd_niter"], cfg["fuse"], cfg["r"], cfg["hf_lowrank_method"]) == (
        "fast",
        2,
        False,
        4,
        "salor",
    )
    assert (out / "compressed" / "base.safetensors").is_file() and (out / "base" / "config.json").is_file()
    # hf-lowrank merge finds the PRUNED base through the adapter's base_model_name_or_path
    assert main(["merge", str(out / "adapter"), "--output-dir", str(tmp_path / "remerged")]) == 0
    ids = torch.randint(0, 100, (1, 12))
    expected = logits(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), str(out / "adapter")), ids
    )
    assert rel_err(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "remerged"), ids), expected) <= 1e-5
    bad = tmp_path / "bad"
    capsys.readouterr()
    assert main([*argv[:8], str(bad), "--set", "sparsity=1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sparsity must be a number in [0, 1)" in err[0] and not bad.exists()


@pytest.mark.slow
def test_salor_eckart_young_bound_on_real_smollm2_layers(smol_dir):
    """||E - E_r||_F^2 <= (1 - r/min(d,k)) ||E||_F^2 for E = W - prune_50%(W) of real SmolLM2-135M layers."""
    from safetensors import safe_open

    from hf_lowrank_salor import magnitude_mask, truncation_error

    path = next(smol_dir.glob("*.safetensors"))
    names = [
        f"model.layers.{i}.{p}.weight"
        for i in (0, 29)
        for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    ]
    with safe_open(str(path), framework="pt") as fh:
        for name in names:
            W = fh.get_tensor(name).float()
            E = W - torch.where(magnitude_mask(W, 0.5), W, torch.zeros(()))
            for r in (16, 64):
                tail, total, bound = truncation_error(E, r)
                assert tail <= bound, (name, r, tail / total)
