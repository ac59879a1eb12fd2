"""Where models come from: local folders or Hub ids, whose own Python code is never run.

A model is named by a folder or a Hub id (``HuggingFaceTB/SmolLM2-135M``, with a revision):
:func:`resolve_model` gives the local folder, downloading through ``huggingface_hub`` into its
cache (``HF_HOME``/``HF_HUB_CACHE``; with ``HF_HUB_OFFLINE=1`` the cache alone), so every command
reads a folder after that. transformers runs a folder's code when its ``config.json`` or ``tokenizer_config.json`` names it in
``auto_map`` and ``trust_remote_code`` allows it, and asks on a terminal when it is not given. Every
config, tokenizer and model this package loads says ``trust_remote_code=False``; a folder that needs
its code is one line naming why.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LowRankError

__all__ = [
    "ModelSource",
    "load_model_config",
    "load_tokenizer",
    "no_remote_code",
    "resolve_adapter_base",
    "looks_like_hub_id",
    "resolve_model",
]

#: ``name`` or ``namespace/name``, as the Hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
#: What a run reads of a Hub model: config, tokenizer, chat template and safetensors weights (no other
#: formats: a repository holding several would download each); ``.bin`` weights only when no safetensors.
_MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_BIN_WEIGHTS = ["pytorch_model*.bin"]


@dataclass(frozen=True)
class ModelSource:
    """A model's local ``folder`` and, when it came from the Hub, its ``hub_id`` and ``revision``: what an
    adapter should name as its base so that it loads on any machine."""

    folder: Path
    hub_id: str | None = None
    revision: str | None = None

    @property
    def name(self) -> str:
        """The Hub id, or the folder."""
        return self.hub_id or str(self.folder)


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub repository id (``name`` or ``namespace/name``) rather than a file."""
    return bool(_HUB_ID.match(name)) and not name.endswith((".json", ".jsonl", ".txt", ".csv", ".parquet"))


def resolve_model(name: str | Path, revision: str | None = None) -> ModelSource:
    """The local folder of a model named by a path or a Hub id (downloaded into the Hub cache once).

    An existing path is a folder, whatever it looks like; anything else that reads as a repository id
    is looked up on the Hub (or in its cache when offline). Every failure is one line naming the fix.
    """
    path = Path(name)
    if path.exists() or not looks_like_hub_id(str(name)):
        if revision is not None:
            raise LowRankError(f"--revision {revision}: {name} is a local folder, not a Hub id; drop --revision")
        return ModelSource(path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(snapshot_download(str(name), revision=revision, allow_patterns=_MODEL_FILES))
        if not list(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(str(name), revision=revision, allow_patterns=_BIN_WEIGHTS))
    except GatedRepoError:
        raise LowRankError(f"{name} is gated on the Hub: accept its terms on its page, then `hf auth login`") from None
    except RevisionNotFoundError:
        raise LowRankError(f"{name} has no revision {revision!r} on the Hub; pass a branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise LowRankError(
            f"model not found: no local folder {name}, and no Hub model of that id (a private one needs "
            "`hf auth login`); pass a transformers checkpoint folder or a Hub id"
        ) from None
    except LocalEntryNotFoundError:
        raise LowRankError(
            f"model not found: no local folder {name}, and the Hub model {name} is not in the Hugging Face cache "
            "while the Hub cannot be reached (HF_HUB_OFFLINE, or no network); download it once online "
            "(`hf download ...`), or pass a local folder"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise LowRankError(f"cannot download {name} from the Hub ({' '.join(str(exc).split())[:160]})") from None
    return ModelSource(folder, hub_id=str(name), revision=revision)


def no_remote_code(exc: Exception, folder: str | Path, what: str) -> LowRankError | None:
    """The one line for a folder whose ``auto_map`` names Python code transformers would have to run."""
    if "trust_remote_code" in str(exc) or "custom code" in str(exc):
        return LowRankError(
            f"{folder}: its {what} needs the folder's own Python code (auto_map), and hf-lowrank never runs code "
            "from a model folder; use a model whose architecture and tokenizer transformers ships"
        )
    return None


def resolve_adapter_base(
    adapter_dir: str | Path, adapter_config: Mapping[str, Any], base: str | None, revision: str | None
) -> ModelSource:
    """An adapter's base: ``base`` when given (at ``revision``), else the one its config names, at
    ``revision`` or the revision the adapter recorded."""
    named = base or adapter_config.get("base_model_name_or_path")
    if not named:
        raise LowRankError(f"adapter {adapter_dir} names no base model; pass --base DIR or a Hub id")
    return resolve_model(named, revision if base else revision or adapter_config.get("revision"))


def _without_folder_code(what: str, folder: str | Path, load: Callable[[], Any], failed: Callable[[str], str]) -> Any:
    """``load()``; a folder that needs its own code, or any other failure (``failed`` of its message), is one line."""
    try:
        return load()
    except Exception as exc:
        refusal = no_remote_code(exc, folder, what)
        if refusal is not None:
            raise refusal from None
        raise LowRankError(failed(" ".join(str(exc).split()))) from None


def load_model_config(folder: str | Path) -> Any:
    """The folder's ``config.json`` as transformers reads it, never running the folder's code (an
    ``auto_map`` beside a built-in ``model_type`` is ignored; one with no built-in class is refused)."""
    from transformers import AutoConfig

    return _without_folder_code(
        "config",
        folder,
        lambda: AutoConfig.from_pretrained(folder, trust_remote_code=False),
        lambda message: f"{Path(folder) / 'config.json'}: transformers cannot read it ({message[:200]})",
    )


def load_tokenizer(folder: str | Path) -> Any:
    """The folder's tokenizer, never running the folder's code (transformers would ask on a terminal,
    and run it on "y"), or one line naming what is missing or damaged."""
    from transformers import AutoTokenizer

    return _without_folder_code(
        "tokenizer",
        folder,
        lambda: AutoTokenizer.from_pretrained(folder, trust_remote_code=False),
        lambda message: (
            f"cannot load the tokenizer in {folder} ({message[:160]}); the folder needs the tokenizer files "
            "save_pretrained writes (tokenizer.json, tokenizer_config.json)"
        ),
    )
