"""Every bad input gets exit 2 (or the library's exception), exactly one line, no traceback, nothing written.

One table of cases, run in-process: each asserts the exit status, that stderr is exactly one line
naming the problem, that no traceback is printed, and that the whole test folder (inputs and
outputs alike) is byte-identical before and after.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertModel

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.app.cli import main
from hf_lowrank_plugins.testing.helpers import make_tiny_model, tiny_llama_config


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with its content hash."""
    return {
        p.relative_to(root).as_posix(): (
            f"link to {p.readlink()}"
            if p.is_symlink()
            else "dir"
            if p.is_dir()
            else hashlib.sha256(p.read_bytes()).hexdigest()
        )
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """A folder of good and bad inputs: models, data files, adapters, checkpoints, output folders."""
    w = tmp_path_factory.mktemp("world")
    shutil.copytree(tiny_model_dir, w / "model")
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(200)]
    (w / "data.txt").write_text("\n".join(lines))
    (w / "short.txt").write_text("a few words only")
    (w / "empty.txt").write_text("")
    (w / "data.xyz").write_text("x")
    (w / "bad_utf8.txt").write_bytes(b"fine line\nbad \xff\xfe bytes\n")
    good = [json.dumps({"text": t}) for t in lines[:5]]
    (w / "bad.jsonl").write_text("\n".join([*good[:2], "{not json", *good[2:]]))
    (w / "list.jsonl").write_text("[1, 2]\n")
    (w / "fields.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    (w / "mixed.jsonl").write_text("\n".join([good[0], json.dumps({"prompt": "p", "completion": "c"})]))
    (w / "textint.jsonl").write_text(json.dumps({"text": 42}) + "\n")
    (w / "messages_str.jsonl").write_text(json.dumps({"messages": "hello"}) + "\n")
    (w / "no_assistant.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (w / "bad.json").write_text('[{"text": "a"},\n {"text": }]')
    (w / "bad.csv").write_text('text\n"one",extra\n')
    (w / "file_model").write_text("not a folder")
    (w / "no_config").mkdir()
    (w / "no_config" / "README.md").write_text("x")
    (w / "bad_config").mkdir()
    (w / "bad_config" / "config.json").write_text("{oops")
    (w / "config_only").mkdir()
    AutoModelForCausalLM.from_config(tiny_llama_config()).config.save_pretrained(w / "config_only")
    torch.manual_seed(0)
    BertModel(
        BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(w / "bert")
    make_tiny_model(intermediate_size=96).save_pretrained(w / "other_base")
    from hf_lowrank_plugins.testing.models import GPT2

    GPT2.build().save_pretrained(w / "gpt2")  # learned positions: n_positions = 64
    # a real adapter, a real checkpoint, and a complete earlier run
    base = [
        "--model",
        str(w / "model"),
        "--dataset",
        str(w / "data.txt"),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--eval-blocks",
        "2",
    ]
    assert (
        main(["train", "--method", "lora", "--rank", "2", "--save-steps", "1", "--output-dir", str(w / "run"), *base])
        == 0
    )
    adapter = w / "run" / "adapter"
    shutil.copytree(adapter, w / "corrupt_adapter")
    (w / "corrupt_adapter" / "adapter_config.json").write_text("{garbage")
    shutil.copytree(adapter, w / "bad_weights_adapter")
    (w / "bad_weights_adapter" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    (w / "garbage_ckpt").mkdir()
    (w / "garbage_ckpt" / "junk.bin").write_bytes(b"\x00\x01")
    (w / "foreign").mkdir()
    (w / "foreign" / "notes.txt").write_text("mine")
    (w / "out_file").write_text("a file")
    (w / "bad.yaml").write_text("max_steps: [1, 2\n")
    (w / "unknown.yaml").write_text("max_stepz: 3\n")
    (w / "wrongtype.yaml").write_text("max_steps: abc\n")
    (w / "list.yaml").write_text("- 1\n- 2\n")
    (w / "data_dir").mkdir()
    (w / "data_dir" / "d.txt").write_text("\n".join(lines))
    return w


def _train(w: Path, *extra: str, method: str = "lora", model: str = "model", data: str = "data.txt") -> list[str]:
    return [
        "train",
        "--method",
        method,
        "--model",
        str(w / model),
        "--dataset",
        str(w / data),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--eval-blocks",
        "2",
        "--output-dir",
        str(w / "out"),
        *extra,
    ]


# (id, argv built from the world folder, text the one line must contain)
CLI_CASES = [
    ("no-command", lambda w: [], "the following arguments are required: command"),
    ("train-no-method", lambda w: ["train"], "required: --method"),
    ("unknown-option", lambda w: [*_train(w), "--nope"], "unrecognized arguments: --nope"),
    ("max-steps-0", lambda w: _train(w, "--max-steps", "0"), "--max-steps must be >= 1"),
    ("max-steps-negative", lambda w: _train(w, "--max-steps", "-3"), "--max-steps must be >= 1"),
    ("max-steps-text", lambda w: _train(w, "--max-steps", "abc"), "argument --max-steps: must be an integer"),
    ("batch-size-0", lambda w: _train(w, "--batch-size", "0"), "--batch-size must be >= 1"),
    ("seq-len-1", lambda w: _train(w, "--seq-len", "1"), "--seq-len must be >= 2"),
    ("grad-accum-0", lambda w: _train(w, "--grad-accum", "0"), "--grad-accum must be >= 1"),
    ("lr-0", lambda w: _train(w, "--lr", "0"), "--lr must be > 0"),
    ("lr-negative", lambda w: _train(w, "--lr", "-0.001"), "--lr must be > 0"),
    ("lr-nan", lambda w: _train(w, "--lr", "nan"), "--lr must be a number"),
    ("lr-inf", lambda w: _train(w, "--lr", "inf"), "--lr must be a finite number"),
    ("lr-text", lambda w: _train(w, "--lr", "fast"), "argument --lr: must be a number"),
    ("seed-negative", lambda w: _train(w, "--seed", "-1"), "--seed must be >= 0"),
    ("seed-too-large", lambda w: _train(w, "--seed", str(2**32)), "--seed must be <= 4294967295"),
    ("eval-blocks-0", lambda w: _train(w, "--eval-blocks", "0"), "--eval-blocks must be >= 1"),
    ("eval-every-0", lambda w: _train(w, "--eval-every", "0"), "--eval-every must be >= 1"),
    ("save-steps-0", lambda w: _train(w, "--save-steps", "0"), "--save-steps must be >= 1"),
    ("warmup-negative", lambda w: _train(w, "--warmup-steps", "-1"), "--warmup-steps must be >= 0"),
    ("grad-norm-negative", lambda w: _train(w, "--max-grad-norm", "-1"), "--max-grad-norm must be >= 0"),
    ("epochs-0", lambda w: _train(w, "--epochs", "0"), "--epochs must be > 0"),
    ("epochs-nan", lambda w: _train(w, "--epochs", "nan"), "--epochs must be a number"),
    ("steps-and-epochs", lambda w: _train(w, "--epochs", "1"), "--max-steps and --epochs both set"),
    ("rank-0", lambda w: _train(w, "--rank", "0"), "--rank must be >= 1"),
    ("rank-fraction", lambda w: _train(w, "--rank", "4.5"), "argument --rank: must be an integer"),
    ("alpha-0", lambda w: _train(w, "--alpha", "0"), "--alpha must be > 0"),
    ("alpha-negative", lambda w: _train(w, "--alpha", "-2"), "--alpha must be > 0"),
    ("dtype-unknown", lambda w: _train(w, "--dtype", "float8"), "argument --dtype: invalid choice: 'float8'"),
    ("merged-dtype-unknown", lambda w: _train(w, "--merged-dtype", "int8"), "argument --merged-dtype: invalid choice"),
    ("report-to-unknown", lambda w: _train(w, "--report-to", "carrier-pigeon"), "--report-to carrier-pigeon: not a"),
    ("report-to-not-installed", lambda w: _train(w, "--report-to", "wandb"), "the wandb package is not installed"),
    ("seq-len-beyond-positions", lambda w: _train(w, "--seq-len", "65", model="gpt2"), "hold 64 positions"),
    ("method-unknown", lambda w: _train(w, method="lorra"), "unknown method 'lorra'. Did you mean 'lora'?"),
    ("set-no-equals", lambda w: _train(w, "--set", "lora_dropout"), "malformed --set 'lora_dropout'"),
    ("set-no-key", lambda w: _train(w, "--set", "=3"), "malformed --set '=3'"),
    ("set-unknown-field", lambda w: _train(w, "--set", "lora_drop=0.1"), "Did you mean 'lora_dropout'"),
    ("set-wrong-type", lambda w: _train(w, "--set", "lora_dropout=abc"), "lora_dropout must be float, got 'abc'"),
    ("set-out-of-range", lambda w: _train(w, "--set", "lora_dropout=1.5"), "lora_dropout must be < 1"),
    ("set-r-fraction", lambda w: _train(w, "--set", "r=4.5"), "r must be int, got 4.5"),
    ("set-r-0", lambda w: _train(w, "--set", "r=0"), "r must be >= 1"),
    ("set-bool-text", lambda w: _train(w, "--set", "use_rslora=maybe"), "use_rslora must be bool"),
    ("rank-and-set-r", lambda w: _train(w, "--rank", "4", "--set", "r=8"), "rank and r set the same option"),
    ("targets-no-match", lambda w: _train(w, "--set", "target_modules=query,value"), "matched no linear layer"),
    ("rank-too-large", lambda w: _train(w, "--rank", "100"), "use rank r <= 32"),
    (
        "set-init-rewrites-base",
        lambda w: _train(w, "--set", "init_lora_weights=olora"),
        "cannot use init_lora_weights='olora' (use --method olora",
    ),
    ("set-init-pissa-on-lora", lambda w: _train(w, "--set", "init_lora_weights=pissa"), "use --method pissa"),
    ("set-init-unknown", lambda w: _train(w, "--set", "init_lora_weights=xavier"), "is not an initialisation"),
    ("full-has-no-rank", lambda w: _train(w, "--rank", "4", method="full"), "method 'full' has no rank setting"),
    ("galore-bad-proj", lambda w: _train(w, "--set", "proj_type=diag", method="galore"), "proj_type must be one of"),
    ("pissa-bad-svd", lambda w: _train(w, "--set", "svd=approx", method="pissa"), "svd must be one of"),
    ("salor-sparsity", lambda w: _train(w, "--set", "sparsity=1.5", method="salor"), "sparsity must be"),
    ("corda-4bit", lambda w: _train(w, "--load-in-4bit", method="corda"), "CorDA decomposes and rewrites"),
    ("full-4bit", lambda w: _train(w, "--load-in-4bit", method="full"), "cannot train on a 4-bit base"),
    ("dora-without-dora", lambda w: _train(w, "--set", "use_dora=false", method="dora"), "needs use_dora=True"),
    ("dataset-missing", lambda w: _train(w, data="missing.txt"), "dataset not found"),
    ("dataset-suffix", lambda w: _train(w, data="data.xyz"), "unsupported dataset"),
    ("dataset-utf8", lambda w: _train(w, data="bad_utf8.txt"), "bad_utf8.txt:2: not UTF-8"),
    ("dataset-json-line", lambda w: _train(w, data="bad.jsonl"), "bad.jsonl:3: not valid JSON"),
    ("dataset-not-object", lambda w: _train(w, data="list.jsonl"), "list.jsonl:1: expected a JSON object"),
    (
        "dataset-fields",
        lambda w: _train(w, data="fields.jsonl"),
        "fields.jsonl:1: records have the fields answer, question",
    ),
    ("dataset-mixed", lambda w: _train(w, data="mixed.jsonl"), "mixed.jsonl:2: record has no 'text' field"),
    ("dataset-text-int", lambda w: _train(w, data="textint.jsonl"), "'text' must be a string"),
    ("dataset-messages-str", lambda w: _train(w, data="messages_str.jsonl"), "'messages' must be a non-empty list"),
    ("dataset-no-assistant", lambda w: _train(w, data="no_assistant.jsonl"), "no assistant turn"),
    ("dataset-empty", lambda w: _train(w, data="empty.txt"), "holds no records"),
    ("dataset-too-short", lambda w: _train(w, data="short.txt"), "gives only 0 blocks of 16 tokens"),
    ("dataset-bad-json", lambda w: _train(w, data="bad.json"), "bad.json:2: not valid JSON"),
    ("dataset-bad-csv", lambda w: _train(w, data="bad.csv"), "bad.csv:2: more values than the header"),
    ("model-missing", lambda w: _train(w, model="missing_model"), "model not found"),
    ("model-file", lambda w: _train(w, model="file_model"), "is a file; pass the checkpoint folder"),
    ("model-no-config", lambda w: _train(w, model="no_config"), "not a transformers checkpoint (no config.json)"),
    ("model-bad-config", lambda w: _train(w, model="bad_config"), "config.json is not valid JSON"),
    ("model-no-weights", lambda w: _train(w, model="config_only"), "has a config.json but no weights"),
    ("model-not-causal", lambda w: _train(w, model="bert"), "not a causal language model"),
    ("resume-missing", lambda w: _train(w, "--resume-from-checkpoint", str(w / "nowhere")), "no such folder"),
    (
        "resume-garbage",
        lambda w: _train(w, "--resume-from-checkpoint", str(w / "garbage_ckpt")),
        "is not a Trainer checkpoint",
    ),
    (
        "resume-other-rank",
        lambda w: _train(w, "--rank", "4", "--resume-from-checkpoint", str(w / "run/checkpoints/checkpoint-1")),
        "r 2 there, 4 here",
    ),
    (
        "resume-other-method",
        lambda w: _train(
            w, "--rank", "2", "--resume-from-checkpoint", str(w / "run/checkpoints/checkpoint-1"), method="dora"
        ),
        "method 'lora' there, 'dora' here",
    ),
    ("output-is-model", lambda w: [*_train(w), "--output-dir", str(w / "model")], "is the base model"),
    ("output-in-model", lambda w: [*_train(w), "--output-dir", str(w / "model/sub")], "lies inside the base model"),
    ("output-foreign", lambda w: [*_train(w), "--output-dir", str(w / "foreign")], "was not written by hf-lowrank"),
    (
        "output-foreign-overwrite",
        lambda w: [*_train(w, "--overwrite"), "--output-dir", str(w / "foreign")],
        "not even with --overwrite",
    ),
    ("output-earlier-run", lambda w: [*_train(w), "--output-dir", str(w / "run")], "pass --overwrite to replace it"),
    ("output-is-file", lambda w: [*_train(w), "--output-dir", str(w / "out_file")], "is a file"),
    (
        "output-holds-dataset",
        lambda w: [*_train(w, data="data_dir/d.txt"), "--output-dir", str(w / "data_dir")],
        "holds the dataset",
    ),
    ("config-missing", lambda w: _train(w, "--config", str(w / "nope.yaml")), "--config"),
    ("config-bad-yaml", lambda w: _train(w, "--config", str(w / "bad.yaml")), "not valid YAML"),
    ("config-unknown-key", lambda w: _train(w, "--config", str(w / "unknown.yaml")), "unknown option 'max_stepz'"),
    ("config-wrong-type", lambda w: _train(w, "--config", str(w / "wrongtype.yaml")), "must be an integer, got 'abc'"),
    ("config-not-mapping", lambda w: _train(w, "--config", str(w / "list.yaml")), "expected option: value pairs"),
    (
        "merge-no-adapter",
        lambda w: ["merge", str(w / "nowhere"), "--output-dir", str(w / "out")],
        "not a saved adapter",
    ),
    (
        "merge-corrupt-config",
        lambda w: ["merge", str(w / "corrupt_adapter"), "--output-dir", str(w / "out")],
        "not valid JSON",
    ),
    (
        "merge-corrupt-weights",
        lambda w: ["merge", str(w / "bad_weights_adapter"), "--base", str(w / "model"), "--output-dir", str(w / "out")],
        "not a readable safetensors file",
    ),
    (
        "merge-other-base",
        lambda w: ["merge", str(w / "run/adapter"), "--base", str(w / "other_base"), "--output-dir", str(w / "out")],
        "but on this LlamaForCausalLM it has shape",
    ),
    (
        "merge-into-adapter",
        lambda w: ["merge", str(w / "run/adapter"), "--output-dir", str(w / "run/adapter")],
        "is the adapter",
    ),
    (
        "merge-base-missing",
        lambda w: ["merge", str(w / "run/adapter"), "--base", str(w / "nobase"), "--output-dir", str(w / "out")],
        "base model not found",
    ),
    (
        "compare-unknown-method",
        lambda w: ["compare", "--methods", "lora,nope", "--output-dir", str(w / "out")],
        "unknown method 'nope'",
    ),
    ("compare-lr-text", lambda w: ["compare", "--lr", "lora=fast", "--output-dir", str(w / "out")], "malformed --lr"),
    ("compare-lr-zero", lambda w: ["compare", "--lr", "0", "--output-dir", str(w / "out")], "positive finite number"),
    (
        "compare-set-unscoped",
        lambda w: ["compare", "--set", "r=4", "--output-dir", str(w / "out")],
        "expected METHOD.KEY=VALUE",
    ),
    (
        "compare-reference",
        lambda w: ["compare", "--methods", "lora,full", "--reference", "dora", "--output-dir", str(w / "out")],
        "reference method 'dora' is not among",
    ),
    (
        "compare-timeout",
        lambda w: ["compare", "--timeout", "-5", "--output-dir", str(w / "out")],
        "expected a positive number of seconds",
    ),
    (
        "compare-output-foreign",
        lambda w: ["compare", "--methods", "lora", "--output-dir", str(w / "foreign")],
        "was not written by hf-lowrank",
    ),
    ("list-unknown-method", lambda w: ["list", "--method", "nope"], "unknown method 'nope'"),
]


@pytest.mark.parametrize("case, argv, expected", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(world, capsys, case, argv, expected):
    capsys.readouterr()
    before = tree(world)
    assert main(argv(world)) == 2, case
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("hf-lowrank: error: ") and "Traceback" not in err[0], err
    assert expected in err[0], err[0]
    assert tree(world) == before


def test_bf16_on_a_machine_without_it(world, capsys, monkeypatch):
    import transformers.utils.import_utils as iu

    monkeypatch.setattr(iu, "is_torch_bf16_available_on_device", lambda device: False)
    before = tree(world)
    assert main(_train(world, "--bf16")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot compute in bfloat16; drop --bf16" in err[0] and tree(world) == before


def test_read_only_output_folder(world, capsys, monkeypatch):
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == world else real(p, mode))
    before = tree(world)
    assert main(_train(world)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(permission denied); choose a writable --output-dir" in err[0] and tree(world) == before


def test_an_internal_error_is_one_line_with_the_debug_hint(world, capsys, monkeypatch):
    from hf_lowrank_plugins.app import train

    monkeypatch.setattr(train, "read_data", lambda *args: (_ for _ in ()).throw(KeyError("a bug of ours")))
    assert main(_train(world)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error: KeyError" in err[0] and "rerun with --debug" in err[0]
    assert main([*_train(world), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


# (id, call, exception type, message pattern): the Python API refuses the same inputs
API_CASES = [
    ("config-type", lambda w: hlp.make_config("lora", r="x"), hlp.ConfigError, "r must be int"),
    ("config-range", lambda w: hlp.make_config("lora", lora_dropout=2.0), hlp.ConfigError, "lora_dropout must be < 1"),
    ("config-unknown", lambda w: hlp.make_config("dora", lora_drop=0.1), hlp.ConfigError, "unknown option"),
    ("config-conflict", lambda w: hlp.make_config("lora", rank=4, r=8), hlp.ConfigError, "set the same option"),
    ("galore-type", lambda w: hlp.make_config("galore", rank="big"), hlp.ConfigError, "rank must be int"),
    ("salor-range", lambda w: hlp.make_config("salor", adapter_sparsity=-0.1), hlp.ConfigError, "adapter_sparsity"),
    ("rank-too-large", lambda w: hlp.attach(make_tiny_model(), "lora", r=1000), hlp.ConfigError, "use rank r <= 32"),
    ("unknown-method", lambda w: hlp.attach(make_tiny_model(), "nope"), hlp.UnknownMethodError, "unknown method"),
    (
        "galore-4bit",
        lambda w: hlp.attach(make_tiny_model(), "galore", load_in_4bit=True),
        hlp.IncompatibleError,
        "cannot train on a quantized",
    ),
    (
        "adapter-other-base",
        lambda w: hlp.load_adapter(make_tiny_model(intermediate_size=96), w / "run/adapter"),
        hlp.IncompatibleError,
        r"has shape \(\d+, 96\)",
    ),
    (
        "export-foreign",
        lambda w: hlp.attach(make_tiny_model(), "lora", r=2).export(w / "foreign"),
        hlp.OutputFolderError,
        "not written by hf-lowrank",
    ),
    (
        "spec-nan",
        lambda w: __import__("hf_lowrank_plugins.app.spec", fromlist=["TrainSpec"]).TrainSpec(
            method="lora", lr=float("nan")
        ),
        hlp.ConfigError,
        "--lr must be a number",
    ),
]


@pytest.mark.parametrize("case, call, error, pattern", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(world, case, call, error, pattern):
    before = tree(world)
    with pytest.raises(error, match=pattern):
        call(world)
    assert tree(world) == before


def test_the_table_covers_at_least_80_bad_inputs():
    assert len(CLI_CASES) + len(API_CASES) + 3 >= 80
