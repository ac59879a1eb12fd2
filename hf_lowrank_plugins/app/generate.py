"""``hf-lowrank generate``: try what you trained, on a run's adapter or merged checkpoint.

The source may be a run folder (its ``merged/`` if there, else its ``adapter/``), an adapter folder
(loaded onto the base it names, or ``--base``), or any transformers checkpoint. Chat models get the
prompt through their chat template; decoding is greedy, so the same prompt gives the same answer.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import LowRankError
from .model import check_model_dir, checkpoint_dtype, load_causal_lm


def resolve(source: str | Path | None, base: str | Path | None = None) -> tuple[Path, Path | None]:
    """(model folder, adapter folder or ``None``) for a run folder, an adapter, or a checkpoint."""
    from .embedded import default_model_dir

    if source is None:
        return default_model_dir(), None
    path = Path(source)
    if (path / "merged" / "config.json").is_file():
        return check_model_dir(path / "merged"), None
    if (path / "adapter" / "adapter_config.json").is_file():
        path = path / "adapter"
    if (path / "adapter_config.json").is_file():
        from ..api import read_adapter_config

        named = base or read_adapter_config(path).get("base_model_name_or_path")
        if not named or not Path(named).is_dir():
            raise LowRankError(f"the base of adapter {path} ({named!r}) is not a local folder; pass --base DIR")
        return check_model_dir(named), path
    return check_model_dir(path), None


def load(source: str | Path | None, base: str | Path | None = None) -> tuple[Any, Any]:
    """The model (adapter applied) in eval mode, and its tokenizer."""
    from transformers import AutoTokenizer

    model_dir, adapter = resolve(source, base)
    tokenizer_dir = adapter if adapter is not None and (adapter / "tokenizer_config.json").is_file() else model_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = load_causal_lm(model_dir, checkpoint_dtype(model_dir))
    if adapter is not None:
        from ..api import load_adapter

        model = load_adapter(model, adapter).model
    return model.eval(), tokenizer


def answer(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int = 64) -> str:
    """The model's greedy reply to a conversation (through the chat template when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None) is not None:
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        encoded = tokenizer("\n".join(m["content"] for m in messages), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return str(tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)).strip()


def chat(model: Any, tokenizer: Any, lines: Iterable[str], max_new_tokens: int = 64) -> None:
    """Interactive chat: each line read is a user turn; the history is kept; EOF ends it."""
    history: list[dict[str, str]] = []
    print("chat with the model; end with Ctrl-D", file=sys.stderr)
    for line in lines:
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.strip()})
        reply = answer(model, tokenizer, history, max_new_tokens)
        history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
