"""Data a user brings: every file type and record shape, with the loss where it belongs, and the CLI options around it."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_lowrank_plugins import LowRankError
from hf_lowrank_plugins.app.cli import main
from hf_lowrank_plugins.app.data import load_training_data
from hf_lowrank_plugins.app.embedded import QUOTE_PROMPT, default_instructions_path, kjv_verses

CHAT = [
    {"role": "user", "content": "Quote John 3:16 from the King James Bible."},
    {"role": "assistant", "content": "For God so loved the world."},
]


@pytest.fixture(scope="module")
def tokenizer(smol_dir):
    return AutoTokenizer.from_pretrained(smol_dir)


def _labelled_text(tokenizer, example):
    return tokenizer.decode(
        [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
    )


def test_chat_records_take_the_loss_on_the_assistant_turns_only(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    two_turns = [
        *CHAT,
        {"role": "user", "content": "And Genesis 1:1?"},
        {"role": "assistant", "content": "In the beginning God created the heaven and the earth."},
    ]
    path.write_text("\n".join(json.dumps({"messages": m}) for m in [CHAT, two_turns] * 3))
    data = load_training_data(path, tokenizer, seq_len=256, eval_examples=1)
    assert data.kind == "messages" and len(data.train) == 5
    example = data.train[1]
    full = tokenizer.apply_chat_template(two_turns, tokenize=False)
    assert tokenizer.decode(example["input_ids"]) == full
    learned = _labelled_text(tokenizer, example)
    assert (
        learned
        == "For God so loved the world.<|im_end|>\nIn the beginning God created the heaven and the earth.<|im_end|>\n"
    )
    everything = load_training_data(path, tokenizer, seq_len=256, eval_examples=1, loss_on_prompt=True).train[1]
    assert everything["labels"] == everything["input_ids"]


def test_prompt_completion_and_alpaca_records(tmp_path, tokenizer):
    pc = tmp_path / "pc.json"
    pc.write_text(json.dumps([{"prompt": "Q: two plus two?\nA:", "completion": " four"}] * 4))
    example = load_training_data(pc, tokenizer, seq_len=64, eval_examples=1).train[0]
    assert _labelled_text(tokenizer, example) == " four" + tokenizer.eos_token

    alpaca = tmp_path / "alpaca.csv"
    with open(alpaca, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        for _ in range(4):
            writer.writerow({"instruction": "Add the numbers.", "input": "2, 2", "output": "4"})
    data = load_training_data(alpaca, tokenizer, seq_len=128, eval_examples=1)
    assert data.kind == "alpaca"
    text = tokenizer.decode(data.train[0]["input_ids"])
    assert "<|im_start|>user\nAdd the numbers.\n\n2, 2<|im_end|>" in text  # through the chat template
    assert _labelled_text(tokenizer, data.train[0]) == "4<|im_end|>\n"


def test_structured_records_win_over_a_rendered_text_field(tmp_path, tokenizer):
    """Alpaca's own dump (instruction, input, output, text) was trained as plain text, the loss on the prompt."""
    path = tmp_path / "alpaca.jsonl"
    record = {"instruction": "Add the numbers.", "input": "2, 2", "output": "4", "text": "Add 2, 2: 4"}
    path.write_text("\n".join(json.dumps(record) for _ in range(4)))
    data = load_training_data(path, tokenizer, seq_len=128, eval_examples=1)
    assert data.kind == "alpaca" and _labelled_text(tokenizer, data.train[0]) == "4<|im_end|>\n"


def test_a_byte_order_mark_and_windows_line_ends_are_not_data(tmp_path, tokenizer):
    """Excel's "CSV UTF-8" starts with a BOM, which became part of the first column's name (or broke the
    first JSON line); a CRLF text file kept a carriage return at the end of every line."""
    bom = "\ufeff".encode()
    csv_file, jsonl_file, text_file = tmp_path / "pc.csv", tmp_path / "pc.jsonl", tmp_path / "t.txt"
    csv_file.write_bytes(bom + b"prompt,completion\r\n" + b"Q?,yes\r\n" * 4)
    jsonl_file.write_bytes(
        bom + b"\n".join(json.dumps({"prompt": "Q?", "completion": "yes"}).encode() for _ in range(4))
    )
    for path in (csv_file, jsonl_file):
        data = load_training_data(path, tokenizer, seq_len=64, eval_examples=1)
        assert (
            data.kind == "prompt_completion" and _labelled_text(tokenizer, data.train[0]) == "yes" + tokenizer.eos_token
        )
    text_file.write_bytes(bom + b"In the beginning God created the heaven and the earth.\r\n" * 40)
    blocks = load_training_data(text_file, tokenizer, seq_len=16, eval_examples=1).train.blocks
    assert "\r" not in tokenizer.decode(blocks.flatten()) and "\ufeff" not in tokenizer.decode(blocks.flatten())


def test_parquet_and_datasets_folders(tmp_path, tokenizer):
    pytest.importorskip("pyarrow")
    from datasets import Dataset

    rows = [{"text": f"line {i}: the quick brown fox"} for i in range(80)]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    a = load_training_data(tmp_path / "d.parquet", tokenizer, seq_len=16, eval_examples=2)
    b = load_training_data(tmp_path / "saved", tokenizer, seq_len=16, eval_examples=2)
    assert a.kind == b.kind == "text" and torch.equal(a.train.blocks, b.train.blocks)


def test_long_examples_are_truncated_and_empty_ones_dropped(tmp_path, tokenizer):
    path = tmp_path / "pc.jsonl"
    rows = [{"prompt": "word " * 100, "completion": "answer"}, {"prompt": "Q?", "completion": "word " * 100}]
    rows += [{"prompt": "Q?", "completion": "yes"}] * 4
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_training_data(path, tokenizer, seq_len=16, eval_examples=1)
    assert len(data.train) + len(data.eval) == 5  # the first lost its completion to truncation
    assert (data.truncated, data.dropped) == (1, 1)  # counted, reported by `train` (nothing silent)
    assert all(len(e["input_ids"]) <= 16 for e in data.train.examples)


def test_embedded_instruction_set_quotes_real_verses():
    verses = dict(kjv_verses())
    assert len(verses) == 31102 and verses["John 3:16"].startswith("For God so loved the world")
    first = json.loads(default_instructions_path().read_text().splitlines()[0])
    reference = first["messages"][0]["content"].removeprefix("Quote ").removesuffix(" from the King James Bible.")
    assert first["messages"][0]["content"] == QUOTE_PROMPT.format(reference=reference)
    assert first["messages"][1]["content"] == verses[reference]


@pytest.mark.integration
def test_chat_training_bf16_base_config_file_and_tensorboard(tmp_path, tiny_model_dir):
    """A bf16 checkpoint stays bf16 (adapters fp32), merged/ is bf16 unless asked; --config values lose to flags;
    --epochs runs over the data; --report-to tensorboard writes into the output folder."""
    base = tmp_path / "bf16"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model.save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(base)
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": CHAT}) for _ in range(12)))
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1.0e-2\nbatch-size: 2\nseq_len: 96\neval_blocks: 2\nrank: 2\nmax_steps: 999\n")
    out = tmp_path / "run"
    argv = [
        "train",
        "--method",
        "lora",
        "--config",
        str(config),
        "--model",
        str(base),
        "--dataset",
        str(data),
        "--output-dir",
        str(out),
        "--epochs",
        "1",
        "--merge",
        "--report-to",
        "tensorboard",
        "--gradient-checkpointing",
    ]
    assert main(argv) == 2  # the file's max_steps conflicts with --epochs: the command line cannot unset it
    config.write_text(config.read_text().replace("max_steps: 999\n", ""))
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data_kind"] == "messages" and metrics["base_dtype"] == "bfloat16"
    assert metrics["steps"] == 5 and metrics["lr"] == 1e-2  # 10 examples, batch 2, one epoch; lr from the file
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.dtype == torch.bfloat16
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))
    from hf_lowrank_plugins.outputs import verify_manifest

    assert verify_manifest(out) == []


def test_reading_stops_at_what_the_run_uses_and_an_eval_set_apart_takes_its_first_examples(
    tmp_path, tokenizer, text_file
):
    """A short run on a large file reads only what it trains on plus the held-out examples; with an
    evaluation set apart, all of what is read trains and the evaluation set's first examples evaluate."""
    whole = load_training_data(text_file, tokenizer, seq_len=16, eval_examples=3)
    short = load_training_data(text_file, tokenizer, seq_len=16, eval_examples=3, max_examples=10)
    assert (len(short.train), len(short.eval)) == (7, 3) and len(whole.train) > 100
    assert torch.equal(short.train.blocks, whole.train.blocks[:7])  # the same first blocks, read no further
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(f"held out line {i}: a different text to evaluate on" for i in range(40)))
    apart = load_training_data(text_file, tokenizer, seq_len=16, eval_examples=3, max_examples=10, eval_source=held_out)
    assert len(apart.train) == 7 and torch.equal(apart.train.blocks, whole.train.blocks[:7])
    assert torch.equal(apart.eval.blocks, load_training_data(held_out, tokenizer, 16, 1).train.blocks[:3])
    assert apart.eval_source == held_out
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    )
    with pytest.raises(LowRankError, match="cannot be evaluated alike"):
        load_training_data(text_file, tokenizer, seq_len=16, eval_examples=1, eval_source=chat)
