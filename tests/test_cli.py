"""The hf-lowrank command: errors are one line and write nothing; an end-to-end run on SmolLM2."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pytest
import torch
from method_settings import SMALL_SETTINGS
from transformers import AutoModelForCausalLM

from hf_lowrank_plugins.app.cli import main
from hf_lowrank_plugins.app.parser import parse_set
from hf_lowrank_plugins.method import owned_fields

pytestmark = pytest.mark.integration  # end to end: left out of `make test-fast`


def _fails_cleanly(capsys, argv, pattern, out_dir):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-lowrank: error: "), err
    assert "Traceback" not in err[0]
    assert pattern in err[0], err[0]
    assert not out_dir.exists()


def test_list_json(capsys):
    assert main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    by_name = {m["name"]: m for m in listed["methods"]}
    assert by_name["lora"]["distribution"] == "hf-lowrank-lora"
    assert by_name["lora"]["config_class"].endswith("LoraMethodConfig")
    assert by_name["qlora"]["version"] == "0.1.0"


def test_bad_input_exits_2_with_one_line_and_writes_nothing(capsys, tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "out"
    base = ["train", "--output-dir", str(out), "--model", str(tiny_model_dir), "--dataset", str(text_file)]
    _fails_cleanly(capsys, [*base, "--method", "lorra"], "unknown method 'lorra'", out)
    _fails_cleanly(
        capsys,
        ["train", "--method", "lora", "--output-dir", str(out), "--dataset", str(tmp_path / "missing.txt")],
        "dataset not found",
        out,
    )
    _fails_cleanly(capsys, [*base, "--method", "lora", "--set", "lora_dropout"], "malformed --set", out)
    _fails_cleanly(capsys, [*base, "--method", "lora", "--set", "lora_drop=0.1"], "unknown option(s) lora_drop", out)
    _fails_cleanly(capsys, [*base, "--method", "lora", "--rank", "100"], "use rank r <= 32", out)
    _fails_cleanly(
        capsys, [*base, "--method", "lora", "--set", "target_modules=query,value"], "matched no linear layer", out
    )
    _fails_cleanly(capsys, ["merge", str(tmp_path / "nowhere"), "--output-dir", str(out)], "not a saved adapter", out)


def test_parse_set_values():
    assert parse_set(["r=8", "use_rslora=true", "lora_dropout=0.05", "target_modules=q_proj,v_proj", "bias=none"]) == {
        "r": 8,
        "use_rslora": True,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
    }


def test_train_jsonl_4bit_on_tiny_model(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"record {i} says hello to the world"}) for i in range(100)))
    out = tmp_path / "run"
    argv = [
        "train",
        "--method",
        "lora",
        "--load-in-4bit",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(data),
        "--output-dir",
        str(out),
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--seq-len",
        "16",
        "--lr",
        "5e-3",
        "--eval-blocks",
        "4",
        "--eval-every",
        "3",
        "--set",
        "lora_dropout=0.0",
        "--set",
        "use_rslora=true",
    ]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["eval_loss_after"] < metrics["eval_loss_before"]
    # each periodic evaluation once: the final evaluate() at step 6 is not listed again
    assert [e["step"] for e in metrics["eval_history"]] == [3, 6]
    assert metrics["eval_history"][-1]["eval_loss"] == metrics["eval_loss_after"]
    assert metrics["config"]["use_rslora"] is True
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "merged").exists()


@pytest.mark.slow
def test_end_to_end_on_real_smollm2(tmp_path, smol_dir):
    """The real command on the real 135M model and the packaged text; then `merge` reproduces merged/."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hf_lowrank_plugins.app.cli",
            "train",
            "--method",
            "lora",
            "--max-steps",
            "4",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--lr",
            "2e-3",
            "--eval-blocks",
            "4",
            "--merge",
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "method",
        "steps",
        "train_loss",
        "eval_loss_before",
        "eval_loss_after",
        "train_seconds",
        "peak_memory_mb",
        "trainable_params",
    ):
        assert key in metrics
    assert metrics["method"] == "lora" and metrics["steps"] == 4
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    # r=8 on all 7 projections of 30 layers: r * (d_in + d_out) each
    per_layer = 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
    assert metrics["trainable_params"] == 30 * per_layer == 2_442_240
    assert (out / "merged" / "tokenizer.json").is_file()
    phases = metrics["peak_memory_by_phase_mb"]
    assert {"load", "init", "train", "export"} <= set(phases)
    peaks = [phases[p]["cpu"] for p in ("load", "init", "train", "export")]
    # each phase's peak is at least the weights it holds (SmolLM2 fp32: 513 MiB) and at most the process's
    assert all(513 < peak <= metrics["peak_memory_mb"] for peak in peaks), phases
    assert max(peaks) == metrics["peak_memory_mb"]
    if not phases["cpu_peak_is_cumulative"]:
        assert phases["train"]["cpu"] > phases["load"]["cpu"]  # gradients, optimizer state, activations

    remerged = tmp_path / "remerged"
    assert main(["merge", str(out / "adapter"), "--output-dir", str(remerged)]) == 0
    batch = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(out / "merged")(batch).logits
        b = AutoModelForCausalLM.from_pretrained(remerged)(batch).logits
    assert (a - b).abs().max() <= 1e-4


#: what hf-lowrank and PEFT fill in themselves (refused in --set, tests/test_bad_inputs_round_two.py)
NOT_SETTABLE = owned_fields()


def test_every_config_field_of_every_method_is_settable_with_set():
    """`--set key=<json>` reaches each field of each installed method's config with its type intact."""
    from hf_lowrank_plugins import get_registry, make_config
    from hf_lowrank_plugins.api import config_fields
    from hf_lowrank_plugins.method import derived_fields

    for name, info in get_registry().methods.items():
        default = info.config_class()
        for field in set(config_fields(info.config_class)) - NOT_SETTABLE - set(derived_fields(info.config_class)):
            value = getattr(default, field)
            config = make_config(name, **parse_set([f"{field}={json.dumps(value)}"]))
            assert getattr(config, field) == value, (name, field)


@pytest.mark.parametrize(
    "method, settings, expected",
    [
        ("dora", ["use_rslora=true", "lora_dropout=0.1"], {"use_rslora": True, "lora_dropout": 0.1, "use_dora": True}),
        (
            "pissa",
            ["svd=fast", "svd_niter=2", "svd_seed=3"],
            {"svd_niter": 2, "svd_seed": 3, "init_lora_weights": "pissa_niter_2"},
        ),
    ],
)
def test_method_options_reach_the_saved_config(tmp_path, tiny_model_dir, text_file, method, settings, expected):
    out = tmp_path / "run"
    argv = [
        "train",
        "--method",
        method,
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
    ]
    assert main([*argv, *(a for s in settings for a in ("--set", s))]) == 0
    saved = json.loads((out / "metrics.json").read_text())["config"]
    assert {k: saved[k] for k in expected} == expected
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["lora_dropout"] == saved["lora_dropout"]


def test_a_relative_model_path_is_recorded_as_the_absolute_base(tmp_path, tiny_model_dir, text_file, monkeypatch):
    """The adapter named its base by the relative --model: merge or generate run from another folder holding a
    different model of that name silently used it."""
    monkeypatch.chdir(tiny_model_dir.parent)
    argv = ["train", "--method", "lora", "--model", tiny_model_dir.name, "--dataset", str(text_file)]
    argv += ["--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2", "--seq-len", "16"]
    assert main([*argv, "--eval-blocks", "2"]) == 0
    adapter_config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir.resolve())


def test_the_method_may_come_from_the_config_file(tmp_path, tiny_model_dir, text_file):
    """--config may hold any option, --method too (it was refused as missing before the file was read)."""
    config = tmp_path / "run.yaml"
    config.write_text("method: dora\nmax_steps: 1\nbatch_size: 2\nseq_len: 16\neval_blocks: 2\n")
    argv = ["train", "--config", str(config), "--model", str(tiny_model_dir), "--dataset", str(text_file)]
    assert main([*argv, "--output-dir", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["method"] == "dora"


def test_resumed_run_reports_the_whole_run_and_checks_the_checkpoint(tmp_path, tiny_model_dir, text_file, capsys):
    """metrics.json after a resume equals the uninterrupted run's; a checkpoint of another run is refused."""

    def argv(out, *extra):
        return [
            "train",
            "--method",
            "lora",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(text_file),
            "--output-dir",
            str(out),
            "--max-steps",
            "6",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--eval-blocks",
            "2",
            "--rank",
            "2",
            "--lr",
            "5e-3",
            "--save-steps",
            "3",
            *extra,
        ]

    assert main(argv(tmp_path / "whole")) == 0
    checkpoint = tmp_path / "whole" / "checkpoints" / "checkpoint-3"
    assert main(argv(tmp_path / "resumed", "--resume-from-checkpoint", str(checkpoint))) == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert resumed["resumed_from_step"] == 3 and whole["resumed_from_step"] is None
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-5)
    assert resumed["eval_loss_after"] == pytest.approx(whole["eval_loss_after"], abs=1e-5)
    assert len(resumed["step_seconds"]) == len(whole["step_seconds"]) == 6
    capsys.readouterr()
    for extra, differs in (
        (["--rank", "4"], "r 2 there, 4 here"),
        (["--method", "dora"], "method 'lora' there, 'dora' here"),
        (["--seq-len", "32"], "seq_len 16 there, 32 here"),  # the batches after the resume would be others
        (["--batch-size", "4"], "batch_size 2 there, 4 here"),
    ):
        assert main(argv(tmp_path / "other", "--resume-from-checkpoint", str(checkpoint), *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "was written by another run" in err[0] and differs in err[0], err
    assert not (tmp_path / "other").exists()


def test_divergence_stops_the_run_with_exit_1_and_delivers_nothing(tmp_path, tiny_model_dir, text_file, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "--method",
        "lora",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(text_file),
        "--output-dir",
        str(out),
        "--max-steps",
        "6",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--eval-blocks",
        "2",
        "--lr",
        "1e30",
        "--max-grad-norm",
        "0",
    ]
    capsys.readouterr()
    assert main(argv) == 1
    stderr = capsys.readouterr().err
    ours = [line for line in re.split(r"[\r\n]+", stderr) if line.startswith("hf-lowrank")]  # the rest: progress
    assert len(ours) == 1 and "Traceback" not in stderr
    assert "training diverged at step" in ours[0] and "lower the learning rate (it is 1e+30)" in ours[0]
    from hf_lowrank_plugins.outputs import read_manifest

    assert read_manifest(out) is None and not (out / "adapter").exists() and not (out / "metrics.json").exists()


def test_a_normal_run_prints_no_third_party_noise(tmp_path, tiny_model_dir, text_file):
    """Our lines, the progress bar and the Trainer's logs only; -v shows the libraries' warnings again."""
    argv = [
        sys.executable,
        "-m",
        "hf_lowrank_plugins",
        "train",
        "--method",
        "lora",
        "--load-in-4bit",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(text_file),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--eval-blocks",
        "2",
    ]
    quiet = subprocess.run([*argv, "--output-dir", str(tmp_path / "a")], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    for noise in ("Warning", "warnings.warn", "deprecated", "kernels-community"):
        assert noise not in quiet.stderr and noise not in quiet.stdout, noise
    assert "'loss'" in quiet.stdout + quiet.stderr and "lora: eval loss" in quiet.stdout
    loud = subprocess.run(
        [*argv, "--output-dir", str(tmp_path / "b"), "-v"], capture_output=True, text=True, timeout=300
    )
    assert loud.returncode == 0 and "Warning" in loud.stderr


def test_every_deliverable_has_a_model_card(tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "run"
    argv = [
        "train",
        "--method",
        "dora",
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
        "--rank",
        "2",
        "--set",
        "lora_dropout=0.1",
        "--merge",
    ]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    adapter_card = (out / "adapter" / "README.md").read_text()
    for expected in (
        f"base_model: {tiny_model_dir}",
        "pipeline_tag: text-generation",
        f"- base_model:adapter:{tiny_model_dir}",
        "# dora adapter of",
        "| `r` | `2` |",
        "| `lora_dropout` | `0.1` |",
        str(text_file),
        "(text records)",
        "| steps | 2 |",
        f"{metrics['eval_loss_before']:.4f}",
        f"{metrics['eval_loss_after']:.4f}",
        'PeftModel.from_pretrained(base, "adapter")',
        "hf-lowrank merge adapter",
        "--max-lora-rank",
        "vLLM does not serve DoRA adapters",
    ):
        assert expected in adapter_card, expected
    merged_card = (out / "merged" / "README.md").read_text()
    assert (
        "library_name: transformers" in merged_card and 'AutoModelForCausalLM.from_pretrained("merged")' in merged_card
    )
    assert "pipeline_tag: text-generation" in merged_card and f"- base_model:finetune:{tiny_model_dir}" in merged_card
    # the whole run's history beside the metrics: every logged step's loss, and the final Trainer state
    assert [entry["step"] for entry in metrics["train_history"]] == [1, 2] and metrics["warnings"] == []
    assert all(entry["loss"] > 0 for entry in metrics["train_history"])
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    files = json.loads((out / "hf-lowrank-manifest.json").read_text())["files"]
    assert {"adapter/README.md", "merged/README.md"} <= set(files)


def test_generate_from_a_run_its_adapter_and_its_merged_checkpoint(
    tmp_path, tiny_model_dir, text_file, capsys, monkeypatch
):
    """The same greedy answer whichever deliverable is loaded; without --prompt, stdin lines are chat turns."""
    out = tmp_path / "run"
    argv = [
        "train",
        "--method",
        "lora",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(text_file),
        "--output-dir",
        str(out),
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--eval-blocks",
        "2",
        "--lr",
        "1e-2",
        "--merge",
    ]
    assert main(argv) == 0
    answers = []
    for source in (out, out / "adapter", out / "merged"):
        capsys.readouterr()
        assert main(["generate", str(source), "--prompt", "the quick brown", "--max-new-tokens", "8"]) == 0
        answers.append(capsys.readouterr().out.strip())
    assert answers[0] == answers[1] == answers[2] and answers[0]
    capsys.readouterr()
    assert main(["generate", str(tiny_model_dir), "--prompt", "the quick brown", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() != answers[0]  # the base answers differently: the adapter is applied
    monkeypatch.setattr(sys, "stdin", io.StringIO("the quick brown\n\nover the lazy\n"))
    assert main(["generate", str(out / "adapter"), "--max-new-tokens", "8"]) == 0
    replies = capsys.readouterr().out.strip().splitlines()
    assert len(replies) == 2 and replies[0] == answers[0]


def test_torch_compile_trains_to_the_eager_runs_losses(tmp_path, tiny_model_dir, text_file):
    """``--torch-compile`` trains the compiled model (dynamo compiles frames, none without the flag): the
    same evaluation losses before and after as the eager run (within 1e-5: the compiler reorders float
    sums), and a saved adapter."""

    def run(name: str, *extra: str) -> dict:
        out = tmp_path / name
        argv = ["train", "--method", "lora", "--model", str(tiny_model_dir), "--dataset", str(text_file)]
        argv += ["--output-dir", str(out), "--max-steps", "3", "--batch-size", "2", "--seq-len", "16"]
        assert main([*argv, "--eval-blocks", "2", *extra]) == 0
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        return json.loads((out / "metrics.json").read_text())

    from torch._dynamo.utils import counters

    counters.clear()
    eager = run("eager")
    assert counters["frames"]["ok"] == 0
    compiled = run("compiled", "--torch-compile")
    assert counters["frames"]["ok"] > 0  # dynamo did compile the forward
    for key in ("eval_loss_before", "eval_loss_after", "train_loss"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-6), key
    assert compiled["eval_loss_after"] != pytest.approx(compiled["eval_loss_before"], abs=1e-6)


def test_version_names_the_core_and_every_plugin_distribution():
    from importlib.metadata import version

    done = subprocess.run([sys.executable, "-m", "hf_lowrank_plugins", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == ""
    line = done.stdout.strip()
    assert line.startswith(f"hf-lowrank {version('hf-lowrank-plugins')} (plugins: ")
    for distribution in ("hf-lowrank-lora", "hf-lowrank-galore", "hf-lowrank-salor"):
        assert f"{distribution} {version(distribution)}" in line


def test_a_reader_that_leaves_early_gets_no_error(tmp_path):
    """`hf-lowrank list | head -1`: exit 141 (the SIGPIPE status shells expect), nothing on stderr."""
    lister = subprocess.Popen(
        [sys.executable, "-m", "hf_lowrank_plugins", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert lister.stdout is not None and lister.stderr is not None
    lister.stdout.close()  # the reader is gone before anything is written
    err = lister.stderr.read().decode()
    assert lister.wait(timeout=120) == 141 and err == ""


def test_a_run_whose_eval_loss_ends_worse_warns_and_records_it(
    tmp_path, tiny_model_dir, text_file, capsys, monkeypatch
):
    """The evaluation before and after training (stubbed here: a random tiny model starts at the uniform
    loss, which no learning rate makes worse) decides the warning."""
    from transformers import Trainer

    losses = iter([2.0, 3.5])
    monkeypatch.setattr(Trainer, "evaluate", lambda self, *a, **k: {"eval_loss": next(losses)})
    out = tmp_path / "run"
    argv = ["train", "--method", "lora", "--model", str(tiny_model_dir), "--dataset", str(text_file)]
    argv += ["--max-steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-blocks", "2"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["eval_loss_before"], metrics["eval_loss_after"]) == (2.0, 3.5)
    assert metrics["warnings"] == [
        "the eval loss ended worse than it started (2 -> 3.5): the run did not learn; lower --lr, or check the data"
    ]
    assert f"hf-lowrank: warning: {metrics['warnings'][0]}" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.parametrize("method", sorted(SMALL_SETTINGS))
def test_every_method_trains_and_merges_from_the_cli(method, tmp_path, tiny_model_dir, text_file):
    """`hf-lowrank train --method <name> --merge` for every shipped method: exit 0, a merged/ that plain
    transformers loads, and where there is an adapter, plain PEFT on the base it names (quantized as the
    run's was) reproduces merged/."""
    from peft import PeftModel

    from hf_lowrank_plugins import QuantizationSettings, get_registry, load_config
    from hf_lowrank_plugins.quantization import quantize_model

    out = tmp_path / "run"
    settings = [arg for key, value in SMALL_SETTINGS[method].items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    argv = [
        *("train", "--method", method, "--model", str(tiny_model_dir), "--dataset", str(text_file)),
        *("--max-steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-blocks", "2", "--lr", "1e-3"),
        *("--merge", "--output-dir", str(out), *settings),
    ]
    assert main(argv) == 0
    ids = torch.arange(3, 19).reshape(1, 16)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(ids).logits
    if not (out / "adapter").is_dir():
        assert not get_registry().get(method).trains_adapter
        return
    config = load_config(out / "adapter")
    base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path)
    if get_registry().get(method).requires_quantized_base:
        base = quantize_model(base, QuantizationSettings.from_config(config))
    with torch.no_grad():
        plain = PeftModel.from_pretrained(base, str(out / "adapter")).eval()(ids).logits
    assert ((plain - merged).norm() / merged.norm()).item() <= 1e-4
