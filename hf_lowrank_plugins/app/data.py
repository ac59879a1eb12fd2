"""Training data a user brings, turned into token examples for the Trainer.

Files: ``.txt`` (one document per line), ``.jsonl``, ``.json`` (a list of records, or an object
holding one under ``data``/``train``), ``.csv``, ``.parquet``, a saved ``datasets`` folder, or a
dataset on the Hugging Face Hub by id (:class:`HubDataset`, through ``datasets.load_dataset``, whose
cache serves it offline). Records, recognised by their fields:

==========================  ========================================================  ================
fields                      becomes                                                   loss on
==========================  ========================================================  ================
``text``                    packed into blocks of ``seq_len`` tokens, EOS between     every token
``messages``                the tokenizer's chat template                             assistant turns
``prompt`` + ``completion`` prompt then completion then EOS                           the completion
``instruction`` + ``output`` a user turn (instruction, blank line, ``input``) and the  the output
(+ ``input``, Alpaca)       answer, through the chat template (the Alpaca prompt
                            format when the tokenizer has none)
``input_ids``               packed as they are (pre-tokenized ``datasets`` folder)    every token
==========================  ========================================================  ================

``loss_on_prompt=True`` trains on every token of instruction data too. Every problem is one
:class:`~hf_lowrank_plugins.errors.LowRankError` naming the file and line (or record) and the fix.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import LowRankError

SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json", ".csv", ".parquet")
#: Record shapes by the fields they need, the most specific first: structured records often carry a
#: rendered ``text`` too (Alpaca's own dump has instruction, input, output and text), which must not turn
#: them into plain text with the loss on the prompt.
KINDS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "tokens": ("input_ids",),
    "text": ("text",),
}
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"
)


@dataclass(frozen=True)
class HubDataset:
    """A dataset named by its Hub id, read with ``datasets.load_dataset(repo_id, config, split=split)``."""

    repo_id: str
    config: str | None = None
    split: str = "train"

    def __str__(self) -> str:
        config = f", config {self.config}" if self.config else ""
        return f"{self.repo_id} (Hub{config}, split {self.split})"


#: Where training data comes from: a local file or folder, or a Hub dataset.
DataSource = Path | HubDataset


def data_source(name: str | Path, config: str | None = None, split: str | None = None) -> DataSource:
    """The source ``name`` means: ``embedded:...``, an existing file or folder, else a Hub dataset id.

    ``config`` and ``split`` select within a Hub dataset (``split`` also within a saved ``DatasetDict``
    folder); anything that is neither an existing path nor an id is one line naming both readings.
    """
    from ..sources import looks_like_hub_id
    from .embedded import dataset_path

    path = dataset_path(name)
    if path.exists():
        if config is not None:
            raise LowRankError(f"--dataset-config {config}: {path} is a local file or folder, not a Hub dataset id")
        if split is not None and not path.is_dir():
            raise LowRankError(
                f"--dataset-split {split}: {path} is a file (splits are a datasets folder's or the Hub's)"
            )
        return path
    if looks_like_hub_id(str(name)) and not str(name).startswith("embedded:"):
        return HubDataset(str(name), config, split or "train")
    raise LowRankError(f"dataset not found: {name}; pass an existing file or datasets folder, or a Hub dataset id")


def _hub_records(source: HubDataset) -> Iterator[Record]:
    try:
        from datasets import load_dataset
    except ImportError:
        raise LowRankError("a Hub dataset needs `pip install 'hf-lowrank-plugins[data]'`") from None
    try:
        # datasets resolves the id (offline: from its own cache) and never runs code from the repository
        rows = load_dataset(source.repo_id, source.config, split=source.split)
    except (ConnectionError, FileNotFoundError) as exc:
        raise LowRankError(
            f"dataset {source.repo_id} is not in the Hugging Face cache and the Hub cannot be reached "
            f"({type(exc).__name__}); load it once online (datasets.load_dataset('{source.repo_id}')) so "
            "that it is cached, or unset HF_HUB_OFFLINE"
        ) from None
    except ValueError as exc:  # an unknown config or split: datasets names the ones that exist
        raise LowRankError(f"dataset {source}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # DatasetNotFoundError, gated or private repositories
        raise LowRankError(f"dataset {source.repo_id}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    for i, row in enumerate(rows, 1):
        yield Record(dict(row), f"{source}: record {i}")


class BlockDataset(Dataset):
    """Fixed-length token blocks for causal LM training (labels equal inputs; the model shifts)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class ExampleDataset(Dataset):
    """Variable-length examples (``input_ids`` and ``labels`` with -100 where no loss is taken)."""

    def __init__(self, examples: list[dict[str, list[int]]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        example = self.examples[i]
        return {
            "input_ids": example["input_ids"],
            "attention_mask": [1] * len(example["input_ids"]),
            "labels": example["labels"],
        }


@dataclass
class TrainingData:
    """What the runner trains and evaluates on.

    Attributes:
        train, eval: the datasets (the last ``eval_examples`` records or blocks are held out, or the
            first of a separate evaluation source).
        kind: which record shape the source had (a key of :data:`KINDS`).
        collator: pads variable-length examples (``None`` for packed blocks).
        source: where the training data came from, and ``eval_source`` the evaluation data, if apart.
        truncated: instruction examples cut to ``seq_len`` tokens (their ends are not learned).
        dropped: instruction examples left with no token to learn after the cut, not used.
    """

    train: Dataset
    eval: Dataset
    kind: str
    collator: Any
    source: DataSource
    truncated: int = 0
    dropped: int = 0
    eval_source: DataSource | None = None


# ----------------------------------------------------------------------------- reading records


@dataclass
class Record:
    """One record and where it came from (``file:line`` or ``file: record N``)."""

    fields: dict[str, Any]
    where: str


#: The roles chat templates render (``tool``: a tool call's result).
CHAT_ROLES = ("system", "user", "assistant", "tool")


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as handle:
        for n, raw in enumerate(handle, 1):
            if b"\x00" in raw:  # valid UTF-8, but no text: a binary file under a text name
                raise LowRankError(f"{path}:{n}: NUL bytes: this is a binary file, not text; pass a UTF-8 text file")
            try:
                # utf-8-sig drops the byte-order mark Excel's "CSV UTF-8" and Windows editors write first,
                # which would otherwise become part of the first field's name or break the first JSON line
                yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise LowRankError(
                    f"{path}:{n}: not UTF-8 text (byte {exc.start + 1} of the line); save the file as UTF-8"
                ) from None


def read_records(path: DataSource, split: str | None = None) -> Iterator[Record]:
    """The records of a data file, a saved ``datasets`` folder or a Hub dataset, in order (see the module
    docstring); ``split`` picks a saved ``DatasetDict``'s split (default: ``train``, else the first)."""
    if isinstance(path, HubDataset):
        yield from _hub_records(path)
        return
    if path.is_dir():
        yield from _dataset_folder(path, split)
        return
    suffix = path.suffix.lower()
    if suffix in (".txt", ".text", ".md"):
        for n, line in _decoded_lines(path):
            if line.strip():
                yield Record({"text": line.rstrip("\r\n")}, f"{path}:{n}")
    elif suffix == ".jsonl":
        for n, line in _decoded_lines(path):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LowRankError(
                    f"{path}:{n}: not valid JSON ({exc.msg}, column {exc.colno}); fix or remove the line"
                ) from None
            if not isinstance(value, dict):
                raise LowRankError(f"{path}:{n}: expected a JSON object per line, got {type(value).__name__}")
            yield Record(value, f"{path}:{n}")
    elif suffix == ".json":
        text = "".join(line for _, line in _decoded_lines(path))
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LowRankError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); fix the file") from None
        if isinstance(value, dict):
            value = next((value[k] for k in ("data", "train") if isinstance(value.get(k), list)), value)
        if not isinstance(value, list):
            raise LowRankError(f"{path}: expected a list of records (or an object with a 'data' or 'train' list)")
        for i, item in enumerate(value, 1):
            if not isinstance(item, dict):
                raise LowRankError(f"{path}: record {i} is a {type(item).__name__}, expected an object")
            yield Record(item, f"{path}: record {i}")
    elif suffix == ".csv":
        lines = [line for _, line in _decoded_lines(path)]
        try:
            for i, row in enumerate(csv.DictReader(lines), 2):
                if None in row:
                    raise LowRankError(f"{path}:{i}: more values than the header has columns; quote commas in values")
                yield Record(dict(row), f"{path}:{i}")
        except csv.Error as exc:
            raise LowRankError(f"{path}: not valid CSV ({exc}); check the quoting") from None
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise LowRankError("a .parquet dataset needs pyarrow: pip install 'hf-lowrank-plugins[data]'") from None
        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise LowRankError(f"{path}: not a readable parquet file ({exc})") from None
        for i, row in enumerate(table.to_pylist(), 1):
            yield Record(row, f"{path}: record {i}")
    else:
        raise LowRankError(f"unsupported dataset {path}: use {', '.join(SUFFIXES)} or a saved datasets folder")


def _dataset_folder(path: Path, split: str | None = None) -> Iterator[Record]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise LowRankError("a saved datasets folder needs `pip install 'hf-lowrank-plugins[data]'`") from None
    try:
        ds = load_from_disk(str(path))
    except Exception as exc:
        raise LowRankError(
            f"{path} is not a saved datasets folder ({type(exc).__name__}: {exc}); use save_to_disk()"
        ) from None
    if isinstance(ds, DatasetDict):
        if split is not None and split not in ds:
            raise LowRankError(f"--dataset-split {split}: {path} has the splits {', '.join(ds)}")
        ds = ds[split or "train"] if (split or "train") in ds else next(iter(ds.values()))
    for i, row in enumerate(ds, 1):
        yield Record(dict(row), f"{path}: record {i}")


def record_kind(record: Record, source: DataSource) -> str:
    """Which record shape ``record`` has (a key of :data:`KINDS`), or a one-line error naming its fields."""
    for kind, needed in KINDS.items():
        if all(name in record.fields for name in needed):
            return kind
    found = ", ".join(sorted(record.fields)) or "none"
    raise LowRankError(
        f"{record.where}: records have the fields {found}; expected text, messages, prompt + completion, "
        "or instruction + output (+ input)"
    )


# ----------------------------------------------------------------------------- tokenizing


def _text(record: Record, name: str) -> str:
    value = record.fields.get(name)
    if not isinstance(value, str):
        raise LowRankError(f"{record.where}: '{name}' must be a string, got {type(value).__name__}")
    return value


def _messages(record: Record) -> list[dict[str, str]]:
    messages = record.fields["messages"]
    if not isinstance(messages, list) or not messages:
        raise LowRankError(f"{record.where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise LowRankError(f"{record.where}: message {i + 1} needs a string 'role' and a string 'content'")
        if m["role"] not in CHAT_ROLES:
            raise LowRankError(
                f"{record.where}: message {i + 1} has role {m['role']!r}; chat templates know "
                f"{', '.join(CHAT_ROLES)}: rename it"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise LowRankError(f"{record.where}: the conversation has no assistant turn to learn from")
    first = next(m["role"] for m in messages if m["role"] != "system")
    if first == "assistant":
        raise LowRankError(
            f"{record.where}: the conversation opens with the assistant; it must open with a user turn "
            "(after any system message), as chat templates render them"
        )
    return messages


def _template_ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def chat_example(
    tokenizer: Any, messages: list[dict[str, str]], where: str, loss_on_prompt: bool
) -> dict[str, list[int]]:
    """Token ids of a conversation through the chat template, labels on the assistant turns only.

    Each assistant turn's tokens are found as the difference between the conversation rendered up
    to the turn's generation prompt and up to the end of the turn (so the end-of-turn token is
    learned too); a template that renders a shorter conversation as something other than a prefix
    of the longer one is refused.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise LowRankError(
            f"{where}: chat records need a tokenizer with a chat template, and this model's has none; use "
            "prompt/completion records or a chat model"
        )
    ids = _template_ids(tokenizer, messages)
    labels = list(ids) if loss_on_prompt else [-100] * len(ids)
    if not loss_on_prompt:
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(_template_ids(tokenizer, messages[:i], generation_prompt=True))
            upto = _template_ids(tokenizer, messages[: i + 1])
            if ids[: len(upto)] != upto or start > len(upto):
                raise LowRankError(
                    f"{where}: the tokenizer's chat template does not render conversations incrementally, so the "
                    "assistant turns cannot be located; pass --loss-on-prompt to train on every token"
                )
            labels[start : len(upto)] = ids[start : len(upto)]
    return {"input_ids": ids, "labels": labels}


def prompt_example(tokenizer: Any, prompt: str, completion: str, loss_on_prompt: bool) -> dict[str, list[int]]:
    """``prompt`` then ``completion`` then EOS; labels on the completion (and EOS) only."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = list(prompt_ids) + list(completion_ids) + eos
    labels = list(ids) if loss_on_prompt else [-100] * len(prompt_ids) + list(completion_ids) + eos
    return {"input_ids": ids, "labels": labels}


def alpaca_example(tokenizer: Any, record: Record, loss_on_prompt: bool) -> dict[str, list[int]]:
    """An Alpaca record as a chat turn (the Alpaca prompt format when the tokenizer has no chat template)."""
    instruction, output = _text(record, "instruction"), _text(record, "output")
    extra = record.fields.get("input") or ""
    if not isinstance(extra, str):
        raise LowRankError(f"{record.where}: 'input' must be a string, got {type(extra).__name__}")
    if getattr(tokenizer, "chat_template", None) is not None:
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return chat_example(tokenizer, messages, record.where, loss_on_prompt)
    prompt = ALPACA_PROMPT.format(
        context=", paired with an input that provides further context" if extra else "",
        instruction=instruction,
        input=f"### Input:\n{extra}\n\n" if extra else "",
    )
    return prompt_example(tokenizer, prompt, output, loss_on_prompt)


def _truncate(example: dict[str, list[int]], seq_len: int) -> dict[str, list[int]] | None:
    example = {k: v[:seq_len] for k, v in example.items()}
    return example if any(label != -100 for label in example["labels"]) else None


def load_training_data(
    path: str | DataSource,
    tokenizer: Any,
    seq_len: int,
    eval_examples: int = 16,
    max_examples: int | None = None,
    loss_on_prompt: bool = False,
    eval_source: str | DataSource | None = None,
    split: str | None = None,
    eval_split: str | None = None,
) -> TrainingData:
    """Read ``path``, tokenize it by record shape, and hold out the last ``eval_examples`` for evaluation,
    or, with ``eval_source``, train on all of ``path`` and evaluate on the first ``eval_examples`` of that.

    ``max_examples`` (train + eval) stops reading early, so a short run on a large file stays quick.
    Instruction examples longer than ``seq_len`` are truncated; one left with no token to learn
    from is dropped.
    """
    source = Path(path) if isinstance(path, str) else path
    apart = Path(eval_source) if isinstance(eval_source, str) else eval_source
    train_budget = max_examples if apart is None or max_examples is None else max_examples - eval_examples
    kind, train, truncated, dropped = _examples(source, tokenizer, seq_len, train_budget, loss_on_prompt, split)
    collator = None
    if kind not in ("text", "tokens"):
        from transformers import DataCollatorForSeq2Seq

        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    wrap = BlockDataset if collator is None else ExampleDataset
    unit = (
        f"blocks of {seq_len} tokens"
        if collator is None
        else f"examples with tokens to learn within --seq-len {seq_len}"
    )
    if apart is not None:
        eval_kind, held_out, _, _ = _examples(apart, tokenizer, seq_len, eval_examples, loss_on_prompt, eval_split)
        if (eval_kind in ("text", "tokens")) != (collator is None):
            raise LowRankError(
                f"--eval-dataset {apart} holds {eval_kind} records but the training data {kind}: packed text and "
                "instruction examples cannot be evaluated alike; give an evaluation set of the same shape"
            )
        if len(train) < 1 or len(held_out) < 1:
            empty = source if len(train) < 1 else apart
            raise LowRankError(f"dataset {empty} gives no {unit}")
        return TrainingData(
            wrap(train[:]), wrap(held_out[:eval_examples]), kind, collator, source, truncated, dropped, apart
        )
    if len(train) < eval_examples + 1:
        raise LowRankError(
            f"dataset {source} gives only {len(train)} {unit}; need at least {eval_examples + 1} "
            + (
                "(use a smaller --seq-len or --eval-blocks, or more text)"
                if collator is None
                else "(a larger --seq-len, a smaller --eval-blocks, or more records)"
            )
        )
    split_at = len(train) - eval_examples
    return TrainingData(wrap(train[:split_at]), wrap(train[split_at:]), kind, collator, source, truncated, dropped)


def _examples(
    source: DataSource,
    tokenizer: Any,
    seq_len: int,
    limit: int | None,
    loss_on_prompt: bool,
    split: str | None,
) -> tuple[str, Any, int, int]:
    """(kind, blocks tensor or example list, truncated, dropped) of ``source``, at most ``limit`` of them."""
    if isinstance(source, Path) and not source.exists():
        raise LowRankError(f"dataset not found: {source}")
    records = read_records(source, split)
    first = next(records, None)
    if first is None:
        raise LowRankError(f"dataset {source} holds no records")
    kind = record_kind(first, source)
    if kind in ("text", "tokens"):
        return kind, _pack(source, kind, [first], records, tokenizer, seq_len, limit), 0, 0
    examples: list[dict[str, list[int]]] = []
    truncated = dropped = 0
    for record in _chain([first], records):
        if record_kind(record, source) != kind:
            raise LowRankError(f"{record.where}: this record's fields differ from the first record's ({kind})")
        if kind == "messages":
            example = chat_example(tokenizer, _messages(record), record.where, loss_on_prompt)
        elif kind == "prompt_completion":
            example = prompt_example(tokenizer, _text(record, "prompt"), _text(record, "completion"), loss_on_prompt)
        else:
            example = alpaca_example(tokenizer, record, loss_on_prompt)
        truncated += len(example["input_ids"]) > seq_len
        kept = _truncate(example, seq_len)
        if kept is None:
            dropped += 1
        else:
            examples.append(kept)
        if limit is not None and len(examples) >= limit:
            break
    return kind, examples, truncated - dropped, dropped


def _chain(*parts: Any) -> Iterator[Record]:
    for part in parts:
        yield from part


def _pack(
    path: DataSource,
    kind: str,
    head: list[Record],
    rest: Iterator[Record],
    tokenizer: Any,
    seq_len: int,
    max_blocks: int | None,
) -> torch.Tensor:
    """Documents joined with EOS and cut into ``seq_len`` blocks (standard LM packing)."""
    budget = None if max_blocks is None else max_blocks * seq_len
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    batch: list[str] = []

    def flush() -> None:
        for row in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(row + eos)
        batch.clear()

    for record in _chain(head, rest):
        if kind == "tokens":
            row = record.fields["input_ids"]
            if not isinstance(row, list) or not all(isinstance(t, int) for t in row):
                raise LowRankError(f"{record.where}: 'input_ids' must be a list of integers")
            ids.extend(row)
        else:
            if "text" not in record.fields:
                raise LowRankError(f"{record.where}: record has no 'text' field (the first record had one)")
            batch.append(_text(record, "text"))
            if len(batch) == 256:
                flush()
        if budget is not None and len(ids) >= budget:
            break
    if batch:
        flush()
    n_blocks = len(ids) // seq_len
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def load_blocks(
    path: str | Path | None, tokenizer: Any, seq_len: int, max_blocks: int | None = None, eval_blocks: int = 16
) -> tuple[Dataset, Dataset]:
    """Text packed into ``seq_len`` blocks (the embedded KJV text when ``path`` is ``None``): (train, eval).

    The benchmarks' and examples' shortcut to :func:`load_training_data`.
    """
    from .embedded import default_text_path

    data = load_training_data(path or default_text_path(), tokenizer, seq_len, eval_blocks, max_blocks)
    return data.train, data.eval
