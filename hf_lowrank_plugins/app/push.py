"""``train --push-to-hub``: the finished run's deliverables uploaded to a Hub repository.

The run is committed locally first, so a failed upload loses nothing: the message names the
command that uploads the same folder later. The adapter goes to the repository's root (where
``PeftModel.from_pretrained(base, repo_id)`` looks), with ``metrics.json`` beside the adapter, and
with ``--push-merged`` ``merged/`` to a ``merged`` folder (``from_pretrained(repo_id, subfolder="merged")``).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import LowRankError

_REPO_ID = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def hub_repo_id(hub_model_id: str | None, output_dir: Path) -> str:
    """The repository to push to (the output folder's name by default), checked before any training."""
    from huggingface_hub import constants

    repo_id = hub_model_id or output_dir.resolve().name
    if not _REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise LowRankError(
            f"--hub-model-id {repo_id!r} is not a Hub repository id; use NAMESPACE/NAME (letters, digits, -, _, .)"
        )
    if constants.HF_HUB_OFFLINE:
        raise LowRankError("--push-to-hub with HF_HUB_OFFLINE=1 set: unset it to upload, or drop --push-to-hub")
    return repo_id


def push_run(output_dir: Path, repo_id: str, private: bool = False, merged: bool = False) -> str:
    """Upload the committed run in ``output_dir`` to ``repo_id``; its URL.

    A new repository is created private with ``private``, else as the Hub creates it for its owner
    (public, unless an organisation says otherwise), as transformers' ``push_to_hub`` does.
    ``merged``: upload ``merged/`` too.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    later = f"hf upload {repo_id} {output_dir / 'adapter'} ."
    try:
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=output_dir / "adapter", commit_message="hf-lowrank: adapter")
        api.upload_file(
            repo_id=repo_id,
            path_or_fileobj=output_dir / "metrics.json",
            path_in_repo="metrics.json",
            commit_message="hf-lowrank: run metrics",
        )
        if merged:
            api.upload_folder(
                repo_id=repo_id,
                folder_path=output_dir / "merged",
                path_in_repo="merged",
                commit_message="hf-lowrank: merged weights",
            )
    except Exception as exc:  # network, auth, quota: the run itself is complete and stays
        message = " ".join(str(exc).split())[:200]
        raise PushError(
            f"the run is complete in {output_dir}, but pushing it to {repo_id} failed ({type(exc).__name__}: "
            f"{message}); log in with `hf auth login` and upload it with `{later}`"
        ) from None
    return str(url)


class PushError(LowRankError):
    """An upload that failed after the run was committed: the environment, not the input (exit 1)."""


__all__ = ["PushError", "hub_repo_id", "push_run"]
