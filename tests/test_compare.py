"""`hf-lowrank compare` and the built-in `full` method, on a tiny model built from config."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.app import compare, report
from hf_lowrank_plugins.app.cli import main
from hf_lowrank_plugins.app.parser import parse_lr, parse_scoped_set

pytestmark = pytest.mark.integration  # end to end: left out of `make test-fast`


def _tiny_run_args(model_dir, data, out) -> list[str]:
    return [
        "--model",
        str(model_dir),
        "--dataset",
        str(data),
        "--output-dir",
        str(out),
        "--max-steps",
        "4",
        "--batch-size",
        "4",
        "--seq-len",
        "16",
        "--eval-blocks",
        "4",
    ]


def test_compare_trains_each_method_in_its_own_process_and_reports_a_failure(
    tmp_path, tiny_model_dir, text_file, capsys
):
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--methods",
        "lora,dora,full",
        *_tiny_run_args(tiny_model_dir, text_file, out),
        "--eval-every",
        "2",
        "--lr",
        "lora=5e-3,full=1e-4",
        "--set",
        "dora.r=1000",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        "[1/3] lora: step 4/4" in printed
        and "[2/3] dora: FAILED" in printed
        and "overall: 3/3 methods done (1 failed)" in printed
    )

    comparison = json.loads((out / "comparison.json").read_text())
    rows = {r["method"]: r for r in comparison["results"]}
    assert list(rows) == ["lora", "dora", "full"] and comparison["reference"] == "lora"
    lora, dora, full = rows["lora"], rows["dora"], rows["full"]
    assert dora["status"] == "failed" and "use rank r <= 32" in dora["error"]
    assert lora["status"] == full["status"] == "ok"
    assert (lora["lr"], full["lr"], dora["lr"]) == (5e-3, 1e-4, hlp.get_registry().get("dora").default_lr)
    assert all(v == pytest.approx(1.0) for v in lora["ratios"].values())
    for key in report.RATIO_FIELDS:
        assert full["ratios"][key] == pytest.approx(full[key] / lora[key])
    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert full["trainable_params"] == total > lora["trainable_params"] > 0
    assert (lora["artifact"], full["artifact"]) == ("adapter", "merged")
    assert full["artifact_bytes"] > 10 * lora["artifact_bytes"]
    for row in (lora, full):
        assert [e["step"] for e in row["eval_history"]] == [0, 2, 4]
        seconds = [e["seconds"] for e in row["eval_history"]]
        assert seconds == sorted(seconds) and row["median_step_seconds"] > 0 and row["peak_memory_mb"] > 0
        assert row["eval_history"][-1]["eval_loss"] == row["eval_loss"] < row["eval_loss_before"]

    md = (out / "comparison.md").read_text()
    assert "| dora | 2e-4 | failed: rank r 1000" in md and "(1.00x)" in md and "| full | 1e-4 | " in md
    assert "## Eval loss by step" in md and "--lr lora=..." in md
    pytest.importorskip("matplotlib")
    assert (out / "loss_curves.png").stat().st_size > 1000 and (out / "cost.png").stat().st_size > 1000


@pytest.mark.parametrize("length, said", [([], "30 steps of"), (["--epochs", "1"], "1 epoch(s) of")])
def test_compare_runs_as_long_as_the_defaults_or_epochs_say(tmp_path, tiny_model_dir, text_file, capsys, length, said):
    """Without --max-steps every method failed at its first step (a progress interval of None // 10)."""
    out = tmp_path / "cmp"
    args = _tiny_run_args(tiny_model_dir, text_file, out)
    at = args.index("--max-steps")
    del args[at : at + 2]
    assert main(["compare", "--methods", "lora", *args, *length]) == 0
    printed = capsys.readouterr().out
    assert "overall: 1/1 methods done" in printed and "FAILED" not in printed
    row = json.loads((out / "comparison.json").read_text())["results"][0]
    assert row["status"] == "ok" and row["eval_history"][-1]["step"] == (30 if not length else row["steps"])
    assert said in (out / "comparison.md").read_text()


def test_train_full_writes_a_plain_checkpoint_equal_to_the_trained_model(tmp_path, tiny_model_dir, text_file):
    """`train --method full` exports merged/ only; plain transformers loads exactly the trained weights."""

    class Snapshot:  # an observer plugin (declares no method), so it sees every method's export
        state: dict[str, torch.Tensor] = {}

        @hlp.hookimpl
        def post_train_merge(self, model, config, output_dir, merge, tokenizer):
            Snapshot.state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # None: full still answers

    registry = hlp.Registry()
    registry.register(Snapshot(), name="snapshot")
    hlp.set_registry(registry)
    out = tmp_path / "full"
    try:
        assert main(["train", "--method", "full", *_tiny_run_args(tiny_model_dir, text_file, out), "--lr", "1e-3"]) == 0
    finally:
        hlp.set_registry(None)
    metrics = json.loads((out / "metrics.json").read_text())
    assert not (out / "adapter").exists() and (out / "merged" / "tokenizer.json").is_file()
    assert metrics["artifact_bytes"]["merged"] > 0 and len(metrics["step_seconds"]) == 4
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert metrics["trainable_params"] == sum(t.numel() for t in base.values())
    assert set(merged) == set(Snapshot.state)
    assert max((merged[k] - Snapshot.state[k]).abs().max().item() for k in merged) <= 1e-5
    assert max((merged[k] - base[k]).abs().max().item() for k in merged) > 1e-4  # it did train


def test_full_is_built_in_and_listed(monkeypatch, capsys):
    monkeypatch.setenv("HF_LOWRANK_DISABLE_PLUGIN_AUTOLOAD", "1")
    info = hlp.Registry().get("full")
    assert (info.trains_adapter, info.supports_quantized_base, info.distribution) == (
        False,
        False,
        "hf-lowrank-plugins",
    )
    monkeypatch.delenv("HF_LOWRANK_DISABLE_PLUGIN_AUTOLOAD")
    assert main(["list"]) == 0 and "full" in capsys.readouterr().out
    with pytest.raises(hlp.ConfigError, match="method 'full' has no rank setting"):
        hlp.make_config("full", rank=4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "lora,nope"], "unknown method 'nope'. Installed methods: "),
        (["--methods", "lora,full", "--set", "r=4"], "expected METHOD.KEY=VALUE"),
        (["--methods", "lora,full", "--set", "dora.r=4"], "--set names method(s) not being compared: dora"),
        (["--methods", "lora,full", "--set", "lora.lora_drop=0.1"], "unknown option(s) lora_drop for method 'lora'"),
        (["--methods", "lora,full", "--lr", "lora=fast"], "malformed --lr"),
        (["--methods", "lora,full", "--reference", "dora"], "reference method 'dora' is not among"),
    ],
)
def test_bad_compare_input_is_one_line_and_writes_nothing(capsys, tmp_path, extra, message):
    out = tmp_path / "cmp"
    assert main(["compare", *extra, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-lowrank: error: ") and message in err[0], err
    if "unknown method" in message:
        assert "full" in err[0] and "lora" in err[0]
    assert not out.exists()


def test_option_parsing_and_defaults():
    assert parse_lr("2e-4,full=5e-5,LoRA-GA=1e-5") == (2e-4, {"full": 5e-5, "lora_ga": 1e-5})
    assert parse_lr(None) == (None, {})
    assert parse_scoped_set(["pissa.svd=fast", "galore.rank=64", "pissa.target_modules=q_proj,v_proj"]) == {
        "pissa": {"svd": "fast", "target_modules": ["q_proj", "v_proj"]},
        "galore": {"rank": 64},
    }
    registry = hlp.get_registry()
    full, lora = registry.get("full"), registry.get("lora")
    assert compare.learning_rate(full, None, {})[0] == 2e-5  # declared by the plugin, with its reason
    assert compare.learning_rate(full, 1e-3, {"full": 5e-5}) == (5e-5, "--lr full=...")
    assert compare.learning_rate(lora, 1e-3, {"full": 5e-5}) == (1e-3, "--lr")
    someones = hlp.MethodInfo(name="someones_method", config_class=lora.config_class)
    assert compare.learning_rate(someones, None, {}, reference=lora) == (
        2e-4,
        "default: its plugin declares none, so the reference method lora's",
    )
    order = compare.default_methods(registry)
    assert order[0] == "lora" and order[-1] == "full" and set(order) == set(registry.methods)


def test_comparison_without_matplotlib_still_writes_json_and_md(tmp_path, monkeypatch):
    """The parent's bookkeeping alone (workers replaced by canned metrics): ratios, reference, no plots."""
    canned = {
        "lora": {
            "trainable_params": 100,
            "init_seconds": 0.5,
            "median_step_seconds": 0.2,
            "peak_memory_mb": 1000.0,
            "eval_loss_before": 3.0,
            "eval_loss_after": 2.0,
            "train_seconds": 2.0,
            "steps": 4,
            "eval_history": [{"step": 4, "seconds": 1.3, "eval_loss": 2.0}],
            "artifact_bytes": {"adapter": 400},
        },
        "full": {
            "trainable_params": 1000,
            "init_seconds": 0.1,
            "median_step_seconds": 0.6,
            "peak_memory_mb": 3000.0,
            "eval_loss_before": 3.0,
            "eval_loss_after": 1.5,
            "train_seconds": 5.0,
            "steps": 4,
            "eval_history": [{"step": 4, "seconds": 2.5, "eval_loss": 1.5}],
            "artifact_bytes": {"merged": 8000},
        },
    }
    monkeypatch.setattr(
        compare, "run_method", lambda run, label, log, timeout=None, **kw: dict(canned[run.method], wall_seconds=1.0)
    )
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    spec = compare.CompareSpec(methods=["full", "lora"], run=compare.TrainSpec(method=""), output_dir=str(tmp_path))
    lines: list[str] = []
    result = compare.run_comparison(spec, log=lines.append)
    full = result["results"][0]
    assert result["reference"] == "lora" and full["method"] == "full"
    assert full["ratios"] == pytest.approx(
        {
            "trainable_params": 10.0,
            "init_seconds": 0.2,
            "median_step_seconds": 3.0,
            "peak_memory_mb": 3.0,
            "eval_loss": 0.75,
            "artifact_bytes": 20.0,
        }
    )
    assert [e["step"] for e in full["eval_history"]] == [0, 4] and full["eval_history"][0]["seconds"] == 0.1
    assert any("matplotlib is not installed" in ln for ln in lines)
    assert "matplotlib is not installed" in (tmp_path / "comparison.md").read_text()
    assert json.loads((tmp_path / "comparison.json").read_text())["results"][1]["method"] == "lora"
    assert not (tmp_path / "loss_curves.png").exists()
