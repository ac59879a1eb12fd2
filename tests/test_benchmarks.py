"""The benchmark scripts keep working: variant planning, ratios, and one real ours-vs-anchor pair end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import hf_lowrank_plugins as hlp

pytestmark = pytest.mark.integration  # end to end: left out of `make test-fast`

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_anchors  # noqa: E402  (needs the path above)


def test_plan_puts_each_anchor_after_ours_and_explains_skips():
    """``--only`` keeps the canonical order; a variant whose plugin is missing is skipped with the
    install command, and its anchor with it (an anchor alone measures nothing of ours)."""
    order, skipped = bench_anchors.plan("peft:dora,ours:dora,full,ours:full", {"dora", "full"})
    assert order == ["ours:dora", "peft:dora", "ours:full", "full"] and skipped == {}
    order, skipped = bench_anchors.plan("ours:dora,peft:dora", {"full"})
    assert order == []
    assert "pip install -e plugins/dora" in skipped["ours:dora"] and "ours:dora" in skipped["peft:dora"]
    with pytest.raises(SystemExit, match="unknown variant"):
        bench_anchors.plan("ours:nope", set())


def test_ratios_are_ours_over_anchor():
    """Every ratio key is ours / anchor; anchors and failed runs get none."""
    keys = list(bench_anchors.RATIO_KEYS)
    results = {
        "ours:lora": {k: 3.0 for k in keys},
        "peft:lora": {k: 2.0 for k in keys},
        "ours:dora": {"error": "boom"},
        "peft:dora": {k: 1.0 for k in keys},
    }
    bench_anchors.add_ratios(results, None)
    assert results["ours:lora"]["vs_anchor"] == {k: 1.5 for k in keys}
    assert "vs_anchor" not in results["peft:lora"] and "vs_anchor" not in results["ours:dora"]


def test_repeated_runs_report_each_figures_median_and_keep_every_run():
    """``--repeats``: each compared figure is the median over the runs, every run's figures are kept,
    and one failed run makes the variant's result that failure."""
    keys = list(bench_anchors.RATIO_KEYS)
    runs = [{**{k: float(v) for k in keys}, "eval_loss": 2.0} for v in (3, 1, 2)]
    merged = bench_anchors.median_of_runs(runs)
    assert {k: merged[k] for k in keys} == {k: 2.0 for k in keys} and merged["eval_loss"] == 2.0
    assert [r[keys[0]] for r in merged["runs"]] == [3.0, 1.0, 2.0]
    assert bench_anchors.median_of_runs([runs[0], {"variant": "x", "error": "boom"}])["error"] == "boom"
    assert bench_anchors.median_of_runs(runs[:1]) is runs[0]


def test_bare_lora_limit_is_lora_maths_without_peft():
    """``limit:bare_lora`` trains exactly PEFT's LoRA parameters (same count, same layers, output
    head excluded), equals the base at initialisation, and leaves every base weight frozen."""
    import copy

    import harness
    import torch

    from hf_lowrank_plugins.testing import LLAMA

    base = LLAMA.build()
    batch = LLAMA.batch()
    bare = harness._bare_lora(copy.deepcopy(base), rank=4)
    peft_lora = hlp.attach(copy.deepcopy(base), "lora", r=4, lora_alpha=4).model
    trainable = {n: p.numel() for n, p in bare.named_parameters() if p.requires_grad}
    assert set(trainable) and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert sum(trainable.values()) == sum(p.numel() for p in peft_lora.parameters() if p.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(bare(**batch).logits, base(**batch).logits, rtol=0, atol=0)
    bare(**batch).logits.sum().backward()
    assert all(p.grad is not None for n, p in bare.named_parameters() if n.endswith("lora_B"))


def test_lora_variant_only_ablation_is_our_lora_through_peft_layer_call():
    """``ours:lora_variant_only``: the same adapters as ``ours:lora`` (fused-add variant on every layer),
    on PEFT's ``Linear`` class, so no step takes the one-node layer; the same outputs as ``ours:lora``."""
    import copy

    import harness
    import torch
    from peft.tuners.lora.layer import Linear

    from hf_lowrank_lora import FusedAddLoraVariant, FusedLoraLinear, lora_layers
    from hf_lowrank_plugins.testing import LLAMA

    base, batch, o = LLAMA.build(), LLAMA.batch(), harness.BenchOptions(rank=4)
    ablation, _, _ = harness.build_variant("ours:lora_variant_only", copy.deepcopy(base), None, o)
    ours, _, _ = harness.build_variant("ours:lora", copy.deepcopy(base), None, o)
    layers = lora_layers(ablation).values()
    assert layers and all(type(m) is Linear and type(m.lora_variant["default"]) is FusedAddLoraVariant for m in layers)
    assert all(type(m) is FusedLoraLinear for m in lora_layers(ours).values())
    with torch.no_grad():
        torch.testing.assert_close(ablation(**batch).logits, ours(**batch).logits, rtol=1e-6, atol=1e-6)
    dora, _, _ = harness.build_variant("ours:dora_variant_only", copy.deepcopy(base), None, o)
    assert all(type(m) is Linear for m in lora_layers(dora).values())


def test_galore_adafactor_pair_end_to_end(tmp_path, smol_dir, capsys):
    """Ours and transformers' GaLore Adafactor, each in its own process on a small model: the JSON
    has both, ours keeps less optimizer state, and the two train to the same eval loss (the same
    arithmetic)."""
    pytest.importorskip("hf_lowrank_galore")
    pytest.importorskip("galore_torch")
    out = tmp_path / "pair.json"
    bench_anchors.main(
        [
            "--only",
            "ours:galore_adafactor,hf:galore_adafactor",
            "--width",
            "64",
            "--layers",
            "1",
            "--galore-rank",
            "8",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--eval-blocks",
            "2",
            "--output",
            str(out),
        ]
    )
    results = json.loads(out.read_text())["results"]
    ours, theirs = results["ours:galore_adafactor"], results["hf:galore_adafactor"]
    assert "error" not in ours and "error" not in theirs, (ours, theirs)
    assert ours["trainable_params"] == theirs["trainable_params"]
    assert ours["opt_state_mib"] < theirs["opt_state_mib"]
    assert abs(ours["eval_loss"] - theirs["eval_loss"]) <= 1e-4
    assert ours["vs_anchor"]["opt_state_mib"] == pytest.approx(ours["opt_state_mib"] / theirs["opt_state_mib"])
    capsys.readouterr()
    bench_anchors.main(["--table-from", str(out)])
    table = capsys.readouterr().out
    assert table.count("\n| ours:galore_adafactor |") == 1 and "| hf:galore_adafactor |" in table


def test_lr_sweep_reuses_finished_runs_and_marks_the_best(tmp_path, monkeypatch):
    """A widened sweep trains only the new rates; each method's lowest final loss is its best."""
    import lr_sweep

    trained = []

    def fake_train(method, lr, steps, settings, out):
        trained.append((method, lr))
        final = abs(lr - 2e-3)  # best at 2e-3
        return {
            "eval_loss_before": 4.0,
            "eval_history": [{"step": steps, "eval_loss": final}, {"step": steps, "eval_loss": final}],
            "init_seconds": 0.1,
            "median_step_seconds": 0.2,
            "peak_memory_mb": 1.0,
        }

    monkeypatch.setattr(lr_sweep, "train", fake_train)
    out = tmp_path / "sweep.json"
    lr_sweep.run_sweep({"lora": [1e-3, 2e-3]}, 10, out)
    runs = lr_sweep.run_sweep({"lora": [1e-3, 2e-3, 4e-3]}, 10, out)
    assert trained == [("lora", 1e-3), ("lora", 2e-3), ("lora", 4e-3)]
    assert [r["lr"] for r in runs if r["best_for_method"]] == [2e-3]
    assert [list(point) for point in runs[0]["curve"]] == [[0, 4.0], [10, pytest.approx(1e-3)]]  # one point per step
    lr_sweep.run_sweep({"lora": [1e-3]}, 20, out)  # another budget: nothing reused
    assert trained[-1] == ("lora", 1e-3) and len(trained) == 4


def test_paired_ratios_are_taken_within_each_round():
    """A machine that slows down by half midway moves every variant's step time, not the ratios."""
    import paired_steps

    times = {"ref": [1.0, 1.0, 2.0, 2.0, 2.0], "other": [1.2, 1.2, 2.4, 2.4, 2.4]}
    ratios = paired_steps.paired_ratios(times, "ref")
    assert ratios == {"ref": 1.0, "other": pytest.approx(1.2)}


def test_paired_steps_end_to_end_and_refuses_variants_needing_trainer_hooks(tmp_path, monkeypatch, capsys):
    """The limits interleaved on a small config-built model: one JSON row per variant, the reference at
    ratio 1; a method whose training needs the Trainer's callbacks (LoRA-GA) is refused, not mis-timed."""
    import paired_steps

    out = tmp_path / "paired.json"
    common = ["--width", "64", "--layers", "2", "--steps", "2", "--warmup", "1", "--output", str(out)]
    monkeypatch.setattr(sys, "argv", ["paired_steps.py", "--variants", "limit:frozen,limit:bare_lora", *common])
    paired_steps.main()
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["limit:frozen", "limit:bare_lora"] and results["limit:frozen"]["ratio"] == 1.0
    assert all(len(row["step_s"]) == 2 and row["median_step_s"] > 0 for row in results.values())
    for row in results.values():  # each phase timed, none longer than the step it is part of
        assert tuple(row["phases_median_s"]) == paired_steps.PHASES
        assert all(0 < seconds <= max(row["step_s"]) for seconds in row["phases_median_s"].values())
    monkeypatch.setattr(sys, "argv", ["paired_steps.py", "--variants", "ours:lora,ours:lora_ga", *common])
    with pytest.raises(SystemExit, match="ours:lora_ga needs the Trainer's callbacks"):
        paired_steps.main()


def test_studies_combine_into_one_set_of_plots_and_mismatched_settings_are_refused(tmp_path, monkeypatch):
    """The README's all-methods figure: the study's rows first (a method in two files comes from the
    first), the added methods after; runs on other budgets would not share axes and are refused."""
    pytest.importorskip("matplotlib")
    import combine_studies

    study = Path(__file__).resolve().parents[1] / "docs" / "study"
    sources = [study / "comparison.json", study / "added" / "eva.json", study / "added" / "corda.json"]
    monkeypatch.setattr(sys, "argv", ["combine_studies.py", str(tmp_path / "all"), *map(str, sources)])
    combine_studies.main()
    combined = json.loads((tmp_path / "all" / "comparison_all.json").read_text())
    methods = [row["method"] for row in combined["results"]]
    assert methods == ["lora", "lora_ga", "pissa", "dora", "galore", "salor", "full", "eva", "corda"]
    study_lora = json.loads(sources[0].read_text())["results"][0]
    assert combined["results"][0] == study_lora  # lora from the study, not the eva run's own lora row
    assert (tmp_path / "all" / "loss_curves.png").stat().st_size > 0

    other = json.loads(sources[2].read_text())
    other["shared_settings"]["max_steps"] = 40
    (tmp_path / "short.json").write_text(json.dumps(other))
    monkeypatch.setattr(
        sys, "argv", ["combine_studies.py", str(tmp_path / "x"), str(sources[0]), str(tmp_path / "short.json")]
    )
    with pytest.raises(SystemExit, match="max_steps differ"):
        combine_studies.main()
