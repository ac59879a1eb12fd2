"""The second catalogue of bad inputs and faults, beyond ``test_bad_inputs.py``: damaged model folders,
models that want to run their own code, PEFT-owned settings, base-rewriting inits, resumes that would
not continue the run they name, generation limits, data, paths and the Python API.

Each CLI case asserts exit 2, exactly one stderr line naming the problem (never "internal error"),
no traceback, and a byte-identical world folder (nothing written, nothing removed, no code run).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.app.cli import main
from hf_lowrank_plugins.testing.helpers import make_tiny_model, tiny_llama_config

pytestmark = pytest.mark.integration  # end to end: left out of `make test-fast`

sys.path.insert(0, str(Path(__file__).parent))
from test_bad_inputs import _train, tree  # noqa: E402

#: what the folder's own code writes when it runs: it never may
RAN = "RAN_FOLDER_CODE"


class Pickled:
    """An arbitrary object in a weights file: torch's weights-only loader refuses to unpickle it."""


def _model_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _edit_json(file: Path, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """Good inputs, a finished run with checkpoints, and damaged copies of them."""
    w = tmp_path_factory.mktemp("world2")
    model = _model_copy(tiny_model_dir, w / "model")
    (w / "data.txt").write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(200)))
    code = f"open({str(w / RAN)!r}, 'w').write('ran')\n"

    remote_model = _model_copy(model, w / "remote_model")  # a model_type transformers does not ship
    _edit_json(remote_model / "config.json", model_type="mystery", auto_map={"AutoConfig": "custom.MysteryConfig"})
    (remote_model / "custom.py").write_text(code)
    remote_tok = _model_copy(model, w / "remote_tokenizer")  # a tokenizer class only the folder's code has
    _edit_json(
        remote_tok / "tokenizer_config.json",
        tokenizer_class="MysteryTokenizer",
        auto_map={"AutoTokenizer": ["custom.MysteryTokenizer", None]},
    )
    (remote_tok / "custom.py").write_text(code)
    no_tok = _model_copy(model, w / "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (no_tok / name).unlink(missing_ok=True)
    truncated = _model_copy(model, w / "truncated")
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    pickled = _model_copy(model, w / "pickled")
    (pickled / "model.safetensors").unlink()
    torch.save({"weights": Pickled()}, pickled / "pytorch_model.bin")  # an object: refused by weights_only

    common = ["--dataset", str(w / "data.txt"), "--batch-size", "2", "--seq-len", "16", "--eval-blocks", "2"]
    run = ["train", "--method", "lora", "--rank", "2", "--model", str(model), *common, "--max-steps", "2"]
    assert main([*run, "--save-steps", "1", "--output-dir", str(w / "run")]) == 0
    no_optimizer = shutil.copytree(w / "run" / "checkpoints" / "checkpoint-1", w / "no_optimizer_ckpt")
    (no_optimizer / "optimizer.pt").unlink()

    (w / "roles.jsonl").write_text(json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}) + "\n")
    first_assistant = [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]
    (w / "assistant_first.jsonl").write_text(json.dumps({"messages": first_assistant}) + "\n")
    (w / "nul.txt").write_bytes(b"\x00" * 4096)
    (w / "nested_set.yaml").write_text("set: [[1, 2]]\n")
    (w / "method_number.yaml").write_text("method: 3\n")
    (w / "set_text.yaml").write_text("set: lora_dropout\n")
    (w / "empty_dir").mkdir()
    (w / "blank.jsonl").write_text("\n\n\n")
    (w / "no_text.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    make_tiny_model(intermediate_size=96).save_pretrained(w / "other_base")
    weightless = shutil.copytree(w / "run" / "checkpoints" / "checkpoint-1", w / "weightless_ckpt")
    (weightless / "adapter_model.safetensors").unlink()
    damaged_state = shutil.copytree(w / "run" / "checkpoints" / "checkpoint-1", w / "damaged_state_ckpt")
    (damaged_state / "trainer_state.json").write_text("{oops")
    (w / "dangling").symlink_to(w / "nowhere_folder")
    auto = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    deepspeed_configs = {
        "ds_not_json": "{oops",
        "ds_list": "[3]",
        "ds_stage5": json.dumps({"zero_optimization": {"stage": 5}}),
        "ds_zero3": json.dumps({"zero_optimization": {"stage": 3}, **auto}),
        "ds_optimizer": json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}, **auto}),
        "ds_batch": json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 3}),
    }
    for name, text in deepspeed_configs.items():
        (w / f"{name}.json").write_text(text)
    big = tiny_llama_config(vocab_size=2**31 - 1, hidden_size=512)
    (w / "huge").mkdir()
    big.save_pretrained(w / "huge")
    return w


def _generate(w: Path, source: str, *extra: str) -> list[str]:
    return ["generate", str(w / source), "--prompt", "hello", *extra]


def _merge(w: Path, base: str) -> list[str]:
    return ["merge", str(w / "run" / "adapter"), "--base", str(w / base), "--output-dir", str(w / "merged_out")]


def _resume(w: Path, checkpoint: str, *extra: str) -> list[str]:
    folder = w / checkpoint if "/" not in checkpoint else w / "run" / "checkpoints" / checkpoint.split("/")[1]
    return _train(w, "--rank", "2", "--save-steps", "1", "--resume-from-checkpoint", str(folder), *extra)


NEVER_RUNS_CODE = "hf-lowrank never runs code from a model folder"
DAMAGED_WEIGHTS = "cannot load the model in"

# (id, argv built from the world folder, text the one line must contain)
CLI_CASES = [
    # models that would run their own code
    ("remote-model-train", lambda w: _train(w, model="remote_model"), NEVER_RUNS_CODE),
    ("remote-model-generate", lambda w: _generate(w, "remote_model"), NEVER_RUNS_CODE),
    ("remote-model-merge", lambda w: _merge(w, "remote_model"), NEVER_RUNS_CODE),
    ("remote-model-plan", lambda w: ["plan", "--method", "lora", "--model", str(w / "remote_model")], NEVER_RUNS_CODE),
    ("remote-tokenizer-train", lambda w: _train(w, model="remote_tokenizer"), NEVER_RUNS_CODE),
    ("remote-tokenizer-generate", lambda w: _generate(w, "remote_tokenizer"), NEVER_RUNS_CODE),
    # damaged model folders
    ("no-tokenizer-train", lambda w: _train(w, model="no_tokenizer"), "cannot load the tokenizer in"),
    ("no-tokenizer-generate", lambda w: _generate(w, "no_tokenizer"), "cannot load the tokenizer in"),
    ("truncated-weights-train", lambda w: _train(w, model="truncated"), DAMAGED_WEIGHTS),
    ("truncated-weights-generate", lambda w: _generate(w, "truncated"), DAMAGED_WEIGHTS),
    ("truncated-weights-merge", lambda w: _merge(w, "truncated"), "the checkpoint is damaged"),
    ("pickled-weights-train", lambda w: _train(w, model="pickled"), DAMAGED_WEIGHTS),
    ("pickled-weights-generate", lambda w: _generate(w, "pickled"), DAMAGED_WEIGHTS),
    # settings hf-lowrank and PEFT own
    *[
        (f"set-{field}", lambda w, f=field, v=value: _train(w, "--set", f"{f}={v}"), f"{field} cannot be set")
        for field, value in [
            ("hf_lowrank_method", "galore"),
            ("peft_type", "NOPE"),
            ("inference_mode", "true"),
            ("base_model_name_or_path", "elsewhere"),
            ("revision", "main"),
            ("auto_mapping", "{}"),
            ("peft_version", "0.1"),
            ("runtime_config", "{}"),
        ]
    ],
    (
        "compare-set-peft-type",
        lambda w: ["compare", "--methods", "lora", "--set", "lora.peft_type=NOPE", "--output-dir", str(w / "cmp")],
        "peft_type cannot be set",
    ),
    # initialisations that rewrite the base, need data, or do not fit the method
    *[
        (
            f"init-{init}-{method}",
            lambda w, i=init, m=method: _train(w, "--set", f"init_lora_weights={i}", method=m),
            text,
        )
        for init, method, text in [
            ("corda", "lora", "CorDA rewrites the base weights"),
            ("eva", "lora", "EVA needs calibration data"),
            ("loftq", "lora", "for a quantized base use --method qlora"),
            ("pissa_niter_4", "lora", "use --method pissa"),
            ("lora_ga", "lora", "use --method lora_ga"),
            ("olora", "dora", "use --method olora"),
            ("mica", "dora", "cannot use init_lora_weights='mica'"),
            ("olora", "pissa", "cannot use init_lora_weights='olora'"),
            ("gaussian", "lora_ga", "LoRA-GA initialises the adapter from the gradients itself"),
            ("gaussian", "pissa", "PiSSA initialises the adapter from the SVD itself"),
            ("orthogonal", "qlora", "cannot use init_lora_weights='orthogonal'"),
            ("olora", "qlora", "use --method olora"),
            ("pissa", "salor", "SALOR cannot be combined with init_lora_weights='pissa'"),
            ("xavier", "dora", "is not an initialisation"),
        ]
    ],
    ("init-orthogonal-odd-rank", lambda w: _train(w, "--rank", "3", "--set", "init_lora_weights=orthogonal"), "even"),
    # resumes that would not continue the run they name
    ("resume-no-optimizer", lambda w: _resume(w, "no_optimizer_ckpt"), "has no optimizer.pt"),
    ("resume-changed-dropout", lambda w: _resume(w, "ckpt/checkpoint-1", "--set", "lora_dropout=0.1"), "lora_dropout"),
    ("resume-changed-bias", lambda w: _resume(w, "ckpt/checkpoint-1", "--set", "bias=all"), "bias 'none' there"),
    ("resume-changed-targets", lambda w: _resume(w, "ckpt/checkpoint-1", "--set", "target_modules=q_proj"), "target"),
    ("resume-steps-behind", lambda w: _resume(w, "ckpt/checkpoint-2", "--max-steps", "1"), "already at step 2"),
    ("resume-steps-equal", lambda w: _resume(w, "ckpt/checkpoint-2", "--max-steps", "2"), "would train nothing"),
    # generation
    ("generate-empty-prompt", lambda w: ["generate", str(w / "model"), "--prompt", ""], "--prompt is empty"),
    ("generate-blank-prompt", lambda w: ["generate", str(w / "model"), "--prompt", "  \n "], "--prompt is empty"),
    (
        "generate-past-positions",
        lambda w: _generate(w, "model", "--max-new-tokens", "1000000000"),
        "use --max-new-tokens 63 or less",
    ),
    ("generate-run-past-positions", lambda w: _generate(w, "run", "--max-new-tokens", "64"), "holds 64 positions"),
    ("generate-checkpoint-without-weights", lambda w: _generate(w, "weightless_ckpt"), "adapter_model"),
    ("generate-missing", lambda w: _generate(w, "nowhere"), "not found"),
    ("generate-empty-folder", lambda w: _generate(w, "empty_dir"), "empty_dir"),
    ("generate-pickled-base", lambda w: _generate(w, "run", "--base", str(w / "pickled")), DAMAGED_WEIGHTS),
    # more resumes
    ("resume-changed-alpha", lambda w: _resume(w, "ckpt/checkpoint-1", "--alpha", "7"), "lora_alpha"),
    ("resume-changed-rslora", lambda w: _resume(w, "ckpt/checkpoint-1", "--set", "use_rslora=true"), "use_rslora"),
    ("resume-changed-seed", lambda w: _resume(w, "ckpt/checkpoint-1", "--seed", "7"), "seed"),
    ("resume-damaged-state", lambda w: _resume(w, "damaged_state_ckpt"), "trainer_state.json"),
    ("resume-other-width", lambda w: [*_resume(w, "ckpt/checkpoint-1"), "--model", str(w / "other_base")], "other"),
    # data
    ("data-unknown-role", lambda w: _train(w, data="roles.jsonl"), "wizard"),
    ("data-assistant-first", lambda w: _train(w, data="assistant_first.jsonl"), "assistant"),
    ("data-nul-bytes", lambda w: _train(w, data="nul.txt"), "nul.txt"),
    ("data-blank-lines", lambda w: _train(w, data="blank.jsonl"), "blank.jsonl"),
    ("data-empty-text", lambda w: _train(w, data="no_text.jsonl"), "no_text.jsonl"),
    ("data-empty-folder", lambda w: _train(w, data="empty_dir"), "empty_dir"),
    # config files and paths
    ("config-nested-set", lambda w: [*_train(w), "--config", str(w / "nested_set.yaml")], "set"),
    ("config-method-number", lambda w: ["train", "--config", str(w / "method_number.yaml")], "method"),
    ("config-set-text", lambda w: [*_train(w), "--config", str(w / "set_text.yaml")], "set"),
    ("output-is-the-model", lambda w: [*_train(w)[:-1], str(w / "model")], "model"),
    ("output-inside-the-model", lambda w: [*_train(w)[:-1], str(w / "model" / "out")], "model"),
    ("output-is-the-dataset", lambda w: [*_train(w)[:-1], str(w / "data.txt")], "data.txt"),
    # plan applies train's checks
    (
        "plan-rank-too-large",
        lambda w: ["plan", "--method", "lora", "--model", str(w / "model"), "--rank", "100000"],
        "rank",
    ),
    (
        "plan-set-owned",
        lambda w: ["plan", "--method", "lora", "--set", "peft_type=X", str(w / "model")],
        "cannot be set",
    ),
    (
        "plan-init-olora",
        lambda w: ["plan", "--method", "lora", "--set", "init_lora_weights=olora", str(w / "model")],
        "olora",
    ),
    (
        "plan-two-models",
        lambda w: ["plan", str(w / "model"), "--method", "lora", "--model", str(w / "gpt")],
        "two models",
    ),
    ("plan-empty-folder", lambda w: ["plan", "--method", "lora", "--model", str(w / "empty_dir")], "config.json"),
    # settings PEFT would read as something else
    (
        "exclude-all-linear",
        lambda w: _train(w, "--set", "exclude_modules=all-linear"),
        "exclude_modules='all-linear' matches no linear layer",
    ),
    ("exclude-no-layer", lambda w: _train(w, "--set", "exclude_modules=q_projj"), "matches no linear layer"),
    # paths
    ("output-dangling-link", lambda w: _train(w, "--output-dir", str(w / "dangling")), "which does not exist"),
    # DeepSpeed configs
    ("deepspeed-missing", lambda w: _train(w, "--deepspeed", str(w / "nope.json")), "no such file"),
    ("deepspeed-not-json", lambda w: _train(w, "--deepspeed", str(w / "ds_not_json.json")), "not valid JSON"),
    ("deepspeed-not-object", lambda w: _train(w, "--deepspeed", str(w / "ds_list.json")), "expected a JSON object"),
    ("deepspeed-stage-5", lambda w: _train(w, "--deepspeed", str(w / "ds_stage5.json")), "must be 0, 1, 2 or 3"),
    (
        "deepspeed-method-refuses-zero",
        lambda w: _train(w, "--deepspeed", str(w / "ds_zero3.json"), method="corda"),
        "cannot train under DeepSpeed ZeRO-3",
    ),
    (
        "deepspeed-optimizer-section",
        lambda w: _train(w, "--deepspeed", str(w / "ds_optimizer.json"), method="galore"),
        "would replace method 'galore''s own optimizer",
    ),
    (
        "deepspeed-batch-disagrees",
        lambda w: _train(w, "--deepspeed", str(w / "ds_batch.json")),
        "train_micro_batch_size_per_gpu is 3",
    ),
    # merge
    ("merge-other-width", lambda w: _merge(w, "other_base"), "96)"),
    ("merge-pickled-base", lambda w: _merge(w, "pickled"), DAMAGED_WEIGHTS),
    ("merge-remote-tokenizer", lambda w: _merge(w, "remote_tokenizer"), NEVER_RUNS_CODE),
    ("merge-missing-adapter", lambda w: ["merge", str(w / "nowhere"), "--output-dir", str(w / "m")], "nowhere"),
    ("merge-model-as-adapter", lambda w: ["merge", str(w / "model"), "--output-dir", str(w / "m")], "adapter"),
]


@pytest.mark.parametrize("case, argv, expected", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(world, capsys, case, argv, expected):
    capsys.readouterr()
    before = tree(world)
    assert main(argv(world)) == 2, capsys.readouterr().err
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("hf-lowrank: error: ") and "Traceback" not in err[0], err
    assert "internal error" not in err[0]
    assert expected in err[0], err[0]
    assert tree(world) == before and not (world / RAN).exists()


def test_plan_of_a_4_tb_embedding_allocates_nothing(world, capsys):
    """A plan builds the model on the meta device only: a 2^31-token embedding is predicted, not allocated."""
    assert main(["plan", "--method", "lora", "--model", str(world / "huge"), "--device", "cpu", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["terms_bytes"]["weights"] >= (2**31 - 1) * 512 * 4 * 2  # embedding and head, float32


def test_generate_refuses_stdin_that_is_not_utf8(world, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello\n\xff\xfe bad\n"), encoding="utf-8"))
    before = tree(world)
    assert main(["generate", str(world / "model"), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "the input is not UTF-8 text" in err[-1] and tree(world) == before


# (id, call, exception type, message pattern): the Python API names the argument it cannot use
API_CASES = [
    ("attach-method-int", lambda w: hlp.attach(make_tiny_model(), 123), hlp.ConfigError, "method must be"),
    ("attach-model-none", lambda w: hlp.attach(None, "lora"), hlp.ConfigError, "model must be"),
    ("attach-model-text", lambda w: hlp.attach("gpt2", "lora"), hlp.ConfigError, "model must be"),
    (
        "attach-4bit-text",
        lambda w: hlp.attach(make_tiny_model(), "lora", load_in_4bit="no"),
        hlp.ConfigError,
        "load_in_4bit must be",
    ),
    ("make-config-list", lambda w: hlp.make_config(["lora"]), hlp.ConfigError, "method must be"),
    ("make-config-owned", lambda w: hlp.make_config("lora", peft_type="LORA"), hlp.ConfigError, "cannot be set"),
    (
        "make-config-inference",
        lambda w: hlp.make_config("dora", inference_mode=True),
        hlp.ConfigError,
        "inference_mode cannot be set",
    ),
    (
        "export-to-int",
        lambda w: hlp.attach(make_tiny_model(), "lora", r=2).export(123),
        hlp.ConfigError,
        "output_dir must be",
    ),
    (
        "load-adapter-int",
        lambda w: hlp.load_adapter(make_tiny_model(), 123),
        hlp.ConfigError,
        "adapter_dir must be",
    ),
    (
        "load-adapter-model-none",
        lambda w: hlp.load_adapter(None, w / "run" / "adapter"),
        hlp.ConfigError,
        "base_model must be",
    ),
    (
        "load-adapter-onto-peft-model",
        lambda w: hlp.load_adapter(
            PeftModel.from_pretrained(make_tiny_model(), w / "run" / "adapter"), w / "run/adapter"
        ),
        hlp.IncompatibleError,
        "already holds an adapter",
    ),
    ("init-not-a-value", lambda w: hlp.make_config("lora", init_lora_weights=[True]), hlp.ConfigError, "not an init"),
    ("make-config-galore-owned", lambda w: hlp.make_config("galore", peft_type="X"), hlp.ConfigError, "cannot be set"),
    ("make-config-method-none", lambda w: hlp.make_config(None), hlp.ConfigError, "method must be"),
    ("attach-method-none", lambda w: hlp.attach(make_tiny_model(), None), hlp.ConfigError, "method must be"),
    (
        "attach-4bit-int",
        lambda w: hlp.attach(make_tiny_model(), "lora", load_in_4bit=1),
        hlp.ConfigError,
        "load_in_4bit",
    ),
    (
        "load-adapter-missing",
        lambda w: hlp.load_adapter(make_tiny_model(), w / "nowhere"),
        hlp.LowRankError,
        "nowhere",
    ),
    (
        "load-adapter-model-folder",
        lambda w: hlp.load_adapter(make_tiny_model(), w / "model"),
        hlp.LowRankError,
        "adapter_config.json",
    ),
    (
        "load-adapter-other-width",
        lambda w: hlp.load_adapter(make_tiny_model(intermediate_size=96), w / "run" / "adapter"),
        hlp.IncompatibleError,
        r"has shape \(\d+, 96\)",
    ),
    (
        "export-merge-text",
        lambda w: hlp.attach(make_tiny_model(), "lora", r=2).export(w / "x", merge="yes"),
        hlp.ConfigError,
        "merge must be",
    ),
]


@pytest.mark.parametrize("case, call, error, pattern", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(world, case, call, error, pattern):
    before = tree(world)
    with pytest.raises(error, match=pattern):
        call(world)
    assert tree(world) == before


def test_the_catalogue_holds_at_least_100_cases():
    assert len(CLI_CASES) + len(API_CASES) + 2 >= 100, len(CLI_CASES) + len(API_CASES) + 2


def test_a_learning_rate_that_blows_the_weights_up_is_warned_of(world, capsys, tmp_path):
    """``--lr 1e9`` stays finite (no divergence stop) but leaves weights of 1e9: the run says so, in metrics too."""
    assert main([*_train(world, "--lr", "1e9"), "--output-dir", str(tmp_path / "hot")]) == 0
    warning = "trained weights reach |w| = "
    assert warning in capsys.readouterr().err
    assert any(warning in w for w in json.loads((tmp_path / "hot" / "metrics.json").read_text())["warnings"])
    assert main([*_train(world), "--output-dir", str(tmp_path / "calm")]) == 0
    assert warning not in capsys.readouterr().err


def test_generate_on_a_checkpoint_of_whole_weights_takes_the_tokenizer_of_its_base(world, capsys, tmp_path):
    """A GaLore checkpoint holds the model, not the tokenizer: its run record names the base that has it."""
    run = [*_train(world, "--rank", "2", "--save-steps", "1", method="galore"), "--output-dir", str(tmp_path / "g")]
    assert main(run) == 0
    checkpoint = tmp_path / "g" / "checkpoints" / "checkpoint-2"
    assert not (checkpoint / "tokenizer_config.json").exists()
    capsys.readouterr()
    assert main(["generate", str(checkpoint), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    from_checkpoint = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "g"), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    assert from_checkpoint == capsys.readouterr().out != ""  # the last checkpoint is the final model
