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
* ``overwrite=True`` replaces an earlier set of ours as a whole, and only once the new one is
  complete: until then the new run writes everything, its checkpoints and logs included, into a
  hidden work folder beside the earlier set, which stays whole and readable (manifest, checkpoints
  and all). A failure or kill before the swap leaves the earlier set as it was. The swap itself is
  a journal of renames recorded in the marker: a kill during it is rolled forward by the next run.
  Entries of the old set that the new one does not produce are removed at the swap, so two runs
  never mix. Entries the folder held beside an earlier set (a user's notes) are recorded in the
  marker as not ours and stay, also when a run that claimed the folder failed and a later one
  replaces it.

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
        self._replacing = False
        self._marker_before: bytes | None = None

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
        if self.path.is_symlink() and not self.path.exists():
            raise OutputFolderError(
                f"output folder {self.path} is a link to {os.readlink(self.path)}, which does not exist; create that "
                "folder or remove the link"
            )
        nearest = next(p for p in (self.path, *self.path.parents) if p.exists())
        if not os.access(nearest, os.W_OK | os.X_OK):
            raise OutputFolderError(f"cannot write to {nearest} (permission denied); choose a writable --output-dir")
        if not self.path.exists():
            return "new"
        entries = [e.name for e in self.path.iterdir() if not _is_leftover(e.name)]
        if not entries:
            return "new"
        marker = _read_marker(self.path)
        if marker is not None and _writer_alive(marker):
            raise OutputFolderError(
                f"another hf-lowrank {marker.get('command', 'run')} (pid {marker['pid']}) is writing to {self.path}; "
                "wait for it or choose another --output-dir"
            )
        if marker is not None and marker.get("status") == "committing":
            _roll_forward(self.path, marker)  # a swap that was killed half-way: finish what was decided
            marker = None
        manifest = read_manifest(self.path)
        if manifest is not None:  # a marker beside it is an overwrite that failed before its swap
            if not self.overwrite:
                failed = " (a later --overwrite did not complete; this set is intact)" if marker else ""
                raise OutputFolderError(
                    f"output folder {self.path} holds an earlier {manifest.get('command', 'run')} output "
                    f"({manifest.get('created', '?')}){failed}; pass --overwrite to replace it, or choose another "
                    "--output-dir"
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
        resume_inside = self.resume_from is not None and _is_within(_resolved(self.resume_from), _resolved(self.path))
        # Replacing: the earlier set (and an unfinished run's checkpoints) stay whole until the swap at commit;
        # the new run's checkpoints and logs go to the stage with its deliverables.
        self._replacing = state in ("complete", "unfinished") and self.overwrite and not resume_inside
        marker_path = self.path / MARKER_NAME
        self._marker_before = marker_path.read_bytes() if marker_path.is_file() else None
        self._write_marker("running")
        self._open = True
        return self

    def _write_marker(self, status: str, **journal: Any) -> None:
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
                **journal,
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

    @property
    def work(self) -> Path:
        """Where the run writes what it does not stage: Trainer checkpoints (``work / CHECKPOINTS``) and the
        ``in_place`` logs. The output folder itself, or the stage when an earlier set is being replaced, so
        that the earlier set stays whole until :meth:`commit` swaps the sets."""
        return self.stage if self._replacing else self.path

    def commit(self, in_place: Iterable[str] = (), info: Mapping[str, Any] | None = None) -> Path:
        """Swap the new set in: staged entries moved into the folder, the old set's entries dropped, the
        manifest last.

        ``in_place`` names entries written straight into :attr:`work` (progress reports such as
        ``comparison.json``) that belong to the set too, besides the constructor's that exist.
        ``info`` is stored in the manifest. Every file is hashed and the manifest written into the
        stage before the swap, which is then renames only, journaled in the marker (see
        :func:`_roll_forward`). Returns the manifest's path.
        """
        if not self._open:
            raise RuntimeError("OutputSet.commit() without open()")
        stage = self.stage
        staged = sorted(p.name for p in stage.iterdir() if p.name != MANIFEST_NAME)
        written_here = (
            set()  # a replacing run wrote everything into the stage; the folder's entries are the old set's
            if self._replacing
            else {name for name in {*in_place, *self.in_place} if name not in staged and (self.path / name).exists()}
        )
        for name in staged:
            _give_default_modes(stage / name)
        files = {}
        for name in sorted((set(staged) | written_here) - {CHECKPOINTS}):
            root = (stage if name in staged else self.path) / name
            for path in sorted([root] if root.is_file() else (p for p in root.rglob("*") if p.is_file())):
                files[(Path(name) / path.relative_to(root)).as_posix()] = {
                    "bytes": path.stat().st_size,
                    "sha256": sha256_file(path),
                }
        manifest = {
            "tool": TOOL,
            "version": _version(),
            "command": self.command,
            "created": _now(),
            "entries": sorted((set(staged) | written_here) - {CHECKPOINTS}),
            "files": files,
            **({"info": dict(info)} if info else {}),
        }
        write_json_atomic(stage / MANIFEST_NAME, manifest)
        trash = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX + "old-", dir=self.path))
        remove = (set(self._previous) | set(staged) | ({CHECKPOINTS} if self._replacing else set())) - written_here
        self._write_marker(
            "committing",
            stage=stage.name,
            trash=trash.name,
            remove=sorted(remove - {MANIFEST_NAME, MARKER_NAME}),
            incoming=staged,
        )
        _roll_forward(self.path, _read_marker(self.path) or {})
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
        if self._replacing:  # the earlier set was never touched: leave the folder as it was found
            if self._marker_before is None:
                (self.path / MARKER_NAME).unlink(missing_ok=True)
            else:
                (self.path / MARKER_NAME).write_bytes(self._marker_before)
            return
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


def _writer_alive(marker: Mapping[str, Any]) -> bool:
    """Whether the marker's writer is another process still running on this host."""
    return (
        marker.get("status") in ("running", "committing")
        and marker.get("host") == socket.gethostname()
        and marker.get("pid") != os.getpid()
        and _pid_alive(int(marker.get("pid", -1)))
    )


def _roll_forward(folder: Path, journal: Mapping[str, Any]) -> None:
    """Carry out (or finish, after a kill) the swap a ``committing`` marker records; every step is idempotent.

    The new set is complete in the stage, its manifest included, before the journal is written, so a
    swap once begun is always finished, never undone: the old manifest goes first (the folder stops
    looking complete), then the old entries (into the trash), then the new ones, then the new manifest.
    """
    stage, trash = folder / journal["stage"], folder / journal["trash"]
    incoming = set(journal.get("incoming", []))
    trash.mkdir(exist_ok=True)
    if (stage / MANIFEST_NAME).exists() and (folder / MANIFEST_NAME).exists():
        os.replace(folder / MANIFEST_NAME, trash / MANIFEST_NAME)
    for name in journal.get("remove", []):
        target = folder / name
        if name in incoming and not (stage / name).exists():
            continue  # already the new set's
        if target.exists() or target.is_symlink():
            if (trash / name).exists():
                _remove(trash / name)
            os.replace(target, trash / name)
    for name in sorted(incoming):
        if (stage / name).exists() or (stage / name).is_symlink():
            os.replace(stage / name, folder / name)
    if (stage / MANIFEST_NAME).exists():
        os.replace(stage / MANIFEST_NAME, folder / MANIFEST_NAME)
    checkpoints = folder / CHECKPOINTS
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()  # the Trainer creates it eagerly; nothing was saved
    (folder / MARKER_NAME).unlink(missing_ok=True)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(stage, ignore_errors=True)


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
