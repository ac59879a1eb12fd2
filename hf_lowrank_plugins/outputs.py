"""Output folders written as one set: never destroy what is not ours, never look complete unless complete.

Every command that writes (``train``, ``merge``, ``compare``, :meth:`Adapted.export`) writes into
an output folder through an :class:`OutputSet`:

* The folder must be new, empty, or hold an earlier output of this tool (recognised by its
  manifest or by the marker of an unfinished run). Anything else is refused, ``overwrite`` or not.
  A folder equal to or inside an input (base model, adapter, dataset, checkpoint), or holding an
  input, is always refused.
* While a run writes, a marker file (:data:`MARKER_NAME`) says so; deliverables are built in a
  hidden staging folder and moved in when all of them exist; the manifest (:data:`MANIFEST_NAME`,
  every deliverable with its size and SHA-256) is written last. A folder with a manifest is a
  complete set; a kill at any moment before leaves no manifest, and the next run names (or, for
  staging leftovers, removes) what it finds.
* ``overwrite=True`` replaces an earlier set of ours as a whole: entries of the old set that the
  new one does not produce are removed when the new set is committed, so two runs never mix; what
  the new run writes straight into the folder (logs) starts empty. Entries the folder held beside
  an earlier set (a user's notes) are recorded in the marker as not ours and stay, also when a run
  that claimed the folder failed and a later one replaces it.

Stdlib only: this module is the library's, and every application command builds on it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import LowRankError
from .io import default_mode, write_json_atomic

MANIFEST_NAME = "hf-lowrank-manifest.json"
MARKER_NAME = ".hf-lowrank-run.json"
STAGING_PREFIX = ".hf-lowrank-staging-"
#: Trainer checkpoints of a run live here; they are intermediate, never part of the manifest.
CHECKPOINTS = "checkpoints"
#: Hidden names our atomic writers leave behind when killed (see :mod:`.io`).
_LEFTOVER_MARKS = (".tmp-", ".old-", STAGING_PREFIX)
TOOL = "hf-lowrank-plugins"


class OutputFolderError(LowRankError):
    """An output folder that cannot be written without destroying something."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(TOOL)
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of a complete set in ``folder``, or ``None`` when there is none (or it is unreadable)."""
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("tool") == TOOL else None


def verify_manifest(folder: str | os.PathLike[str], checksums: bool = True) -> list[str]:
    """Problems with the set in ``folder``: missing manifest, missing files, other sizes or checksums.

    An empty list means the folder holds exactly the complete set its manifest describes.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return [f"{folder} has no {MANIFEST_NAME}: not a complete output of {TOOL}"]
    problems = []
    for rel, meta in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif path.stat().st_size != meta["bytes"]:
            problems.append(f"{rel} has {path.stat().st_size} bytes, the manifest says {meta['bytes']}")
        elif checksums and sha256_file(path) != meta["sha256"]:
            problems.append(f"{rel} does not match its checksum")
    return problems


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("tool") == TOOL else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_leftover(name: str) -> bool:
    return name.startswith(".") and any(mark in name for mark in _LEFTOVER_MARKS)


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(path).expanduser().resolve()


def check_inputs_apart(
    output: str | os.PathLike[str],
    inputs: Mapping[str, str | os.PathLike[str] | None],
    allowed_inside: Iterable[str | os.PathLike[str]] = (),
) -> None:
    """Raise :class:`OutputFolderError` when ``output`` is an input, lies inside one, or holds one.

    ``inputs`` maps a role (``"base model"``, ``"adapter"``, ...) to a path (``None`` entries are
    skipped). ``allowed_inside`` names inputs that may live inside ``output`` (a checkpoint of
    the unfinished run being resumed).
    """
    out = _resolved(output)
    allowed = [_resolved(p) for p in allowed_inside]
    for role, path in inputs.items():
        if path is None or str(path) == "":
            continue
        where = _resolved(path)
        if _is_within(out, where):
            what = "is" if out == where else "lies inside"
            raise OutputFolderError(
                f"output folder {output} {what} the {role} {path}; writing there would destroy an input: "
                "choose an --output-dir outside it"
            )
        if _is_within(where, out) and not any(_is_within(where, a) for a in allowed):
            raise OutputFolderError(
                f"output folder {output} holds the {role} {path}; replacing its contents would destroy an input: "
                "choose another --output-dir, or move the input out first"
            )


class OutputSet:
    """One output folder, claimed for a run and committed as one complete set (see the module docstring).

    Use as a context manager, or call :meth:`open`, then :meth:`commit` (or :meth:`abort`)::

        with OutputSet("runs/x", command="train", inputs={"base model": model_dir}) as out:
            write_things(out.stage)      # a hidden folder inside runs/x
            out.commit()                 # moves them in, writes the manifest last

    Args:
        path: the output folder.
        command: what writes it (recorded in the marker and the manifest).
        inputs: role -> path of every input; the folder may not be, be inside, or hold any of them.
        overwrite: replace an earlier set of ours (complete or unfinished); never anything else.
        resume_from: a checkpoint the run resumes from; when it lies in this folder, the folder's
            unfinished run is continued instead of refused, and its checkpoints are kept.
        in_place: names the run writes straight into the folder rather than the stage (a
            ``tensorboard/`` log); an earlier set's entries of these names are removed when the
            folder is claimed, so the new run's logs do not mix with the old, and they belong to the
            set at :meth:`commit`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        command: str,
        inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
        overwrite: bool = False,
        resume_from: str | os.PathLike[str] | None = None,
        in_place: Iterable[str] = (),
    ) -> None:
        self.path = Path(path)
        self.in_place = tuple(in_place)
        self.command = command
        self.inputs = dict(inputs or {})
        self.overwrite = overwrite
        self.resume_from = resume_from
        self.cleaned: list[str] = []
        self._stage: Path | None = None
        self._created: list[Path] = []
        self._previous: list[str] = []
        #: entries that were in the folder beside an earlier set, not ours: never replaced
        self._foreign: list[str] = []
        self._open = False

    # ------------------------------------------------------------------ checks

    def check(self) -> str:
        """Check the folder without writing anything; returns its state.

        States: ``"new"`` (absent or empty), ``"complete"`` (an earlier set of ours, replaced only
        with ``overwrite``), ``"unfinished"`` (a run of ours that stopped before its manifest:
        continued when resuming from one of its checkpoints, replaced with ``overwrite``).
        Raises :class:`OutputFolderError` for anything else, naming the fix.
        """
        resume_inside = self.resume_from is not None and _is_within(_resolved(self.resume_from), _resolved(self.path))
        inputs = dict(self.inputs)
        if self.resume_from is not None:
            inputs.setdefault("checkpoint", self.resume_from)
        check_inputs_apart(self.path, inputs, allowed_inside=[self.path / CHECKPOINTS] if resume_inside else [])
        if self.path.exists() and not self.path.is_dir():
            raise OutputFolderError(f"output folder {self.path} is a file; choose a folder that is new or empty")
        nearest = next(p for p in (self.path, *self.path.parents) if p.exists())
        if not os.access(nearest, os.W_OK | os.X_OK):
            raise OutputFolderError(f"cannot write to {nearest} (permission denied); choose a writable --output-dir")
        if not self.path.exists():
            return "new"
        entries = [e.name for e in self.path.iterdir() if not _is_leftover(e.name)]
        if not entries:
            return "new"
        manifest, marker = read_manifest(self.path), _read_marker(self.path)
        if (
            marker is not None
            and marker.get("status") == "running"
            and marker.get("host") == socket.gethostname()
            and marker.get("pid") != os.getpid()
            and _pid_alive(int(marker.get("pid", -1)))
        ):
            raise OutputFolderError(
                f"another hf-lowrank {marker.get('command', 'run')} (pid {marker['pid']}) is writing to {self.path}; "
                "wait for it or choose another --output-dir"
            )
        if manifest is not None and marker is None:
            if not self.overwrite:
                raise OutputFolderError(
                    f"output folder {self.path} holds an earlier {manifest.get('command', 'run')} output "
                    f"({manifest.get('created', '?')}); pass --overwrite to replace it, or choose another --output-dir"
                )
            return "complete"
        if marker is not None:
            if resume_inside or self.overwrite:
                return "unfinished"
            raise OutputFolderError(
                f"output folder {self.path} holds an unfinished {marker.get('command', 'run')} (started "
                f"{marker.get('started', '?')}, never completed); resume it with --resume-from-checkpoint "
                f"{self.path / CHECKPOINTS}/checkpoint-N, pass --overwrite to start over, or choose another --output-dir"
            )
        shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
        raise OutputFolderError(
            f"output folder {self.path} is not empty and was not written by hf-lowrank (it holds {shown}); "
            "nothing there is ever replaced, not even with --overwrite: choose a new or empty --output-dir"
        )

    # ------------------------------------------------------------------ life cycle

    def open(self) -> OutputSet:
        """Check, then claim the folder: clean staging leftovers, write the marker. Returns ``self``."""
        state = self.check()
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self.path.mkdir(parents=True, exist_ok=True)
        self._created = missing  # deepest first: removed again by abort() if still empty
        for entry in list(self.path.iterdir()):
            if _is_leftover(entry.name):
                _remove(entry)
                self.cleaned.append(entry.name)
        old_marker = _read_marker(self.path)
        present = {e.name for e in self.path.iterdir()} - {MANIFEST_NAME, MARKER_NAME, CHECKPOINTS}
        if old_marker is not None:  # an unfinished run of ours: what it left is replaced at commit, not what it found
            self._foreign = sorted(set(old_marker.get("foreign", [])) & present)
            self._previous = sorted((set(old_marker.get("previous", [])) | present) - set(self._foreign))
        if state == "complete":
            manifest = read_manifest(self.path) or {}
            self._previous = sorted(
                {rel.split("/", 1)[0] for rel in manifest.get("files", {})} | set(manifest.get("entries", []))
            )
            self._foreign = sorted(present - set(self._previous))
        self._write_marker("running")
        if state == "complete":
            (self.path / MANIFEST_NAME).unlink()  # the old set stops being complete from here on
        resume_inside = self.resume_from is not None and _is_within(_resolved(self.resume_from), _resolved(self.path))
        if state in ("complete", "unfinished") and self.overwrite and not resume_inside:
            shutil.rmtree(self.path / CHECKPOINTS, ignore_errors=True)  # the old run's, never mixed with ours
            for name in set(self.in_place) & set(self._previous):  # the old run's logs, never mixed with ours
                _remove(self.path / name)
        self._open = True
        return self

    def _write_marker(self, status: str) -> None:
        write_json_atomic(
            self.path / MARKER_NAME,
            {
                "tool": TOOL,
                "version": _version(),
                "command": self.command,
                "status": status,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": _now(),
                "previous": self._previous,
                "foreign": self._foreign,
            },
        )

    @property
    def stage(self) -> Path:
        """A hidden folder inside the output folder where deliverables are written before :meth:`commit`."""
        if not self._open:
            raise RuntimeError("OutputSet.stage used before open()")
        if self._stage is None:
            self._stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.path))
        return self._stage

    def commit(self, in_place: Iterable[str] = (), info: Mapping[str, Any] | None = None) -> Path:
        """Move every staged entry into the folder, drop the old set's other entries, write the manifest last.

        ``in_place`` names entries written straight into the folder (progress reports such as
        ``comparison.json``) that belong to the set too, besides the constructor's that exist.
        ``info`` is stored in the manifest. Returns the manifest's path.
        """
        if not self._open:
            raise RuntimeError("OutputSet.commit() without open()")
        staged = sorted(p.name for p in self._stage.iterdir()) if self._stage is not None else []
        in_place = {*in_place, *(name for name in self.in_place if (self.path / name).exists())}
        entries = sorted(set(staged) | in_place)
        trash = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX + "old-", dir=self.path))
        for name in sorted(set(self._previous) | set(staged)):
            if name in in_place or name in (MANIFEST_NAME, MARKER_NAME, CHECKPOINTS):
                continue
            target = self.path / name
            if target.exists() or target.is_symlink():
                os.replace(target, trash / name)
        for name in staged:
            assert self._stage is not None
            _give_default_modes(self._stage / name)
            os.replace(self._stage / name, self.path / name)
        checkpoints = self.path / CHECKPOINTS
        if checkpoints.is_dir() and not any(checkpoints.iterdir()):
            checkpoints.rmdir()  # the Trainer creates it eagerly; nothing was saved
        files = {}
        for name in entries:
            root = self.path / name
            for path in sorted([root] if root.is_file() else (p for p in root.rglob("*") if p.is_file())):
                files[path.relative_to(self.path).as_posix()] = {
                    "bytes": path.stat().st_size,
                    "sha256": sha256_file(path),
                }
        manifest = {
            "tool": TOOL,
            "version": _version(),
            "command": self.command,
            "created": _now(),
            "entries": entries,
            "files": files,
            **({"info": dict(info)} if info else {}),
        }
        write_json_atomic(self.path / MANIFEST_NAME, manifest)
        shutil.rmtree(trash, ignore_errors=True)
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
        (self.path / MARKER_NAME).unlink(missing_ok=True)
        self._open = False
        return self.path / MANIFEST_NAME

    def abort(self) -> None:
        """Drop the staging folder. A folder left with nothing else is removed again (nothing written);
        otherwise the marker stays, saying the run did not complete."""
        if not self._open:
            return
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
        self._open = False
        remaining = [e for e in self.path.iterdir() if e.name != MARKER_NAME] if self.path.is_dir() else []
        checkpoints = self.path / CHECKPOINTS
        if remaining == [checkpoints] and checkpoints.is_dir() and not any(checkpoints.iterdir()):
            checkpoints.rmdir()
            remaining = []
        if remaining:
            self._write_marker("failed")
            return
        (self.path / MARKER_NAME).unlink(missing_ok=True)
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:
                break

    def __enter__(self) -> OutputSet:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()  # a no-op after commit(); otherwise the set was never completed


def _remove(path: Path) -> None:
    """Remove ``path``: a folder with its contents, a file or a link (never what a link points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _give_default_modes(root: Path) -> None:
    """Give ``root`` and everything in it the modes the umask gives new files and folders.

    Writers that go through a private temporary name (safetensors' ``save_file``, ``tempfile``) leave
    a deliverable readable by its owner only (0600), so a serving account or a colleague could not
    read the model; everything else in a set gets the umask's modes already.
    """
    file_mode, dir_mode = default_mode(directory=False), default_mode(directory=True)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if not path.is_symlink():
            os.chmod(path, dir_mode if path.is_dir() else file_mode)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
