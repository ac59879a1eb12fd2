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

from ..checkpoints import check_model_dir, checkpoint_dtype, load_causal_lm
from ..errors import LowRankError
from ..sources import load_tokenizer, resolve_adapter_base, resolve_model
from .model import position_limit


def resolve(
    source: str | Path | None, base: str | Path | None = None, revision: str | None = None
) -> tuple[Path, Path | None]:
    """(model folder, adapter folder or ``None``) for a run folder, an adapter, a checkpoint or a model
    (a folder or a Hub id)."""
    from .embedded import default_model_dir

    if source is None:
        return default_model_dir(), None
    path = Path(source)
    if not path.exists():
        return check_model_dir(resolve_model(source, revision).folder), None
    if (path / "merged" / "config.json").is_file():
        return check_model_dir(path / "merged"), None
    if (path / "adapter" / "adapter_config.json").is_file():
        path = path / "adapter"
    if (path / "adapter_config.json").is_file():
        from ..loading import read_adapter_config

        base_source = resolve_adapter_base(path, read_adapter_config(path), str(base) if base else None, revision)
        return check_model_dir(base_source.folder), path
    return check_model_dir(path), None


def load(source: str | Path | None, base: str | Path | None = None, revision: str | None = None) -> tuple[Any, Any]:
    """The model (adapter applied) in eval mode, and its tokenizer."""
    model_dir, adapter = resolve(source, base, revision)
    tokenizer = load_tokenizer(_tokenizer_folder(model_dir, adapter))
    model = load_causal_lm(model_dir, checkpoint_dtype(model_dir))
    if adapter is not None:
        from ..loading import load_adapter

        model = load_adapter(model, adapter).model
    return model.eval(), tokenizer


def _tokenizer_folder(model_dir: Path, adapter: Path | None) -> Path:
    """Where the tokenizer is: with the adapter if saved there, else with the model; a Trainer checkpoint of
    whole weights (GaLore, full fine-tuning) holds none, so its run record names the base that has it."""
    if adapter is not None and (adapter / "tokenizer_config.json").is_file():
        return adapter
    if adapter is None and not (model_dir / "tokenizer_config.json").is_file():
        from .runstate import recorded_base

        base = recorded_base(model_dir)
        if base is not None:
            return resolve_model(*base).folder
    return model_dir


#: ``--max-new-tokens`` when none is given (capped by what the model's positions leave after the prompt).
DEFAULT_NEW_TOKENS = 64


def check_max_new_tokens(model: Any, max_new_tokens: int) -> None:
    """Refuse an answer longer than the model reads positions (it would generate past them for as long as
    asked: a billion tokens ran for half an hour), naming the largest that fits."""
    limit = position_limit(model.config)
    if limit is not None and max_new_tokens >= limit:
        raise LowRankError(
            f"--max-new-tokens {max_new_tokens} is more than the model reads: it holds {limit} positions, "
            f"prompt included; use --max-new-tokens {limit - 1} or less"
        )


def answer(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int = DEFAULT_NEW_TOKENS) -> str:
    """The model's greedy reply to a conversation (through the chat template when the tokenizer has one),
    at most ``max_new_tokens`` long and ending where the model's positions end."""
    if getattr(tokenizer, "chat_template", None) is not None:
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        encoded = tokenizer("\n".join(m["content"] for m in messages), return_tensors="pt")
    prompt_tokens = int(encoded["input_ids"].shape[1])
    limit = position_limit(model.config)
    if limit is not None:
        if prompt_tokens >= limit:
            raise LowRankError(
                f"the {'conversation' if len(messages) > 1 else 'prompt'} is {prompt_tokens} tokens and the model "
                f"reads {limit} positions; shorten it (or start a new chat)"
            )
        max_new_tokens = min(max_new_tokens, limit - prompt_tokens)
    with torch.no_grad():
        out = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return str(tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)).strip()


def _utf8_lines(lines: Iterable[str]) -> Iterable[str]:
    """``lines`` as read, or one line naming the fix when the input is not UTF-8 text."""
    try:
        yield from lines
    except UnicodeDecodeError as exc:
        raise LowRankError(
            f"the input is not UTF-8 text (byte {exc.object[exc.start : exc.start + 1]!r} at {exc.start}); "
            "pass UTF-8 text on stdin"
        ) from None


def chat(model: Any, tokenizer: Any, lines: Iterable[str], max_new_tokens: int = DEFAULT_NEW_TOKENS) -> None:
    """Interactive chat: each line read is a user turn; the history is kept; EOF ends it."""
    history: list[dict[str, str]] = []
    print("chat with the model; end with Ctrl-D", file=sys.stderr)
    for line in _utf8_lines(lines):
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.strip()})
        reply = answer(model, tokenizer, history, max_new_tokens)
        history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
