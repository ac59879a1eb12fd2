"""Atomic writes: a deliverable either exists complete or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_directory(final: str | os.PathLike[str], replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``final``; on success it becomes ``final``.

    On an exception the temporary directory is removed and ``final`` is left as it was. A
    non-empty ``final`` is refused (``FileExistsError``) unless ``replace`` is true: whole output
    sets are replaced by :class:`~hf_lowrank_plugins.outputs.OutputSet`, which knows what is ours;
    this helper does not. The swap is renames on one file system, so a reader never sees a
    half-written directory.
    """
    final = Path(final)
    if not replace and final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise FileExistsError(f"{final} already exists and is not empty; refusing to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, default_mode(directory=True))  # mkdtemp makes it 0700, and it is renamed into place
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextmanager
def atomic_file(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``final`` (same suffix, so writers that go by it still work);
    on success it replaces ``final`` by a rename, on an exception it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=final.suffix, dir=final.parent)
    os.close(fd)
    os.chmod(tmp, default_mode(directory=False))  # mkstemp makes it 0600, and it is renamed into place
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    finally:
        Path(tmp).unlink(missing_ok=True)


def default_mode(directory: bool) -> int:
    """The permissions ``mkdir`` or ``open`` would give a new folder or file under the process's umask.

    Temporary names from :mod:`tempfile` are private (0700/0600), fit for scratch but not for a
    deliverable renamed into place: a serving account or a colleague could not read the model.
    """
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
