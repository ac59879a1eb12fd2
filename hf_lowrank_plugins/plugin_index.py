"""What each installed plugin declares, remembered between runs.

A method's name, summary and limits are only known from its plugin's ``describe_methods``, so
without a memory every command would import every plugin (and torch, PEFT and whatever each
plugin pulls in) to learn which one provides ``--method X``. The index keeps each plugin's
declarations, as ``hf-lowrank list --json`` prints them, keyed by what would change them:

* the entry point (name and ``module:attr`` value) and its distribution's name and version, so an
  upgrade or a new plugin is read afresh;
* a fingerprint of the plugin's package sources (file count, total size, newest mtime), so an
  edit of an editable install is read afresh too.

Plugins that failed to load are not remembered: they are tried, and reported, on every run. An
entry point without a value (registered by hand, or a test's fake) is never remembered. The
index is a cache only: when it cannot be read or written, every plugin is imported as before and
nothing else changes.

``HF_LOWRANK_PLUGIN_INDEX`` names the file (default ``$XDG_CACHE_HOME/hf-lowrank/plugin-index.json``);
``off`` keeps no index.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

ENV_INDEX = "HF_LOWRANK_PLUGIN_INDEX"
_FORMAT = 1


def index_path() -> Path | None:
    """Where the index lives, or ``None`` when it is switched off."""
    configured = os.environ.get(ENV_INDEX, "").strip()
    if configured.lower() in ("off", "0", "none"):
        return None
    if configured:
        return Path(configured).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "hf-lowrank" / "plugin-index.json"


def source_fingerprint(module: str) -> str | None:
    """Count, total size and newest mtime of the sources of ``module``'s top-level package.

    ``find_spec`` of a top-level name locates it without running it, so no plugin is imported
    here. ``None`` when the sources cannot be found (a namespace or zip import): such a plugin is
    always imported.
    """
    top = module.split(":")[0].split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    files = [Path(spec.origin)] if not roots and spec.origin and os.path.isfile(spec.origin) else []
    for root in roots:
        files.extend(Path(root).rglob("*.py"))
    if not files:
        return None
    stats = [f.stat() for f in files]
    return f"{len(stats)}:{sum(s.st_size for s in stats)}:{max(s.st_mtime_ns for s in stats)}"


def entry_key(name: str, value: str | None, distribution: tuple[str, str]) -> str | None:
    """The index key of one entry point, or ``None`` when it cannot be remembered."""
    if not value:
        return None
    fingerprint = source_fingerprint(value)
    if fingerprint is None:
        return None
    return f"{name}={value}|{distribution[0]}=={distribution[1]}|{fingerprint}"


class PluginIndex:
    """Declarations by entry key: a list of method descriptions (``MethodInfo.as_dict()``), empty for
    a plugin that provides no method (an observer of other methods' hooks)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, list[dict[str, Any]]] = {}
        self._changed = False
        if path is None:
            return
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            return  # no index yet, or a damaged one: rebuilt from the plugins
        if isinstance(stored, dict) and stored.get("format") == _FORMAT and isinstance(stored.get("entries"), dict):
            self._entries = stored["entries"]

    def lookup(self, key: str | None) -> list[dict[str, Any]] | None:
        """What the plugin under ``key`` declared, or ``None`` when it is not known."""
        if key is None:
            return None
        found = self._entries.get(key)
        return found if isinstance(found, list) and all(isinstance(m, dict) for m in found) else None

    def store(self, key: str | None, declarations: list[dict[str, Any]]) -> None:
        """Remember what the plugin under ``key`` declared (nothing when ``key`` is ``None``)."""
        if key is None or self._entries.get(key) == declarations:
            return
        self._entries[key] = declarations
        self._changed = True

    def save(self, current: set[str]) -> None:
        """Write the index if it changed, dropping earlier states of the entry points in ``current``.

        Entries of entry points this environment does not have stay: another environment may share
        the file.
        """
        names = {key.split("|")[0] for key in current}
        stale = {key for key in self._entries if key not in current and key.split("|")[0] in names}
        if self.path is None or not (self._changed or stale):
            return
        for key in stale:
            del self._entries[key]
        text = json.dumps({"format": _FORMAT, "entries": self._entries}, indent=1, sort_keys=True)
        # atomic, so that concurrent commands read either index whole; a cache that cannot be written costs time only
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".plugin-index.")
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(text)
                os.replace(tmp, self.path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        self._changed = False
