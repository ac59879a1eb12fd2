"""Plugins are imported only when used: ``list`` reads the plugin index, ``--method X`` imports X's plugin.

The third-party plugins here are real distributions on disk (a ``dist-info`` folder with
``entry_points.txt``, as pip installs them), found by ``importlib.metadata`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hf_lowrank_plugins.plugin_index import ENV_INDEX, PluginIndex, entry_key

pytestmark = pytest.mark.integration

SLEEPER = """
import os, pathlib, time
import hf_lowrank_plugins as hlp
from hf_lowrank_lora import LoraMethodConfig
with open(os.environ["IMPORT_LOG"], "a") as log:
    log.write("{name}\\n")
time.sleep({sleep})

@hlp.hookimpl
def describe_methods():
    return [hlp.MethodInfo(name="{name}", config_class=LoraMethodConfig, summary="{summary}")]
"""


def _distribution(site: Path, name: str, summary: str = "a third-party method", sleep: float = 0.0) -> Path:
    """A plugin installed as pip would: its module and a dist-info naming its entry point."""
    module = site / f"{name}_plugin.py"
    module.write_text(SLEEPER.format(name=name, summary=summary, sleep=sleep))
    info = site / f"{name}_plugin-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[hf_lowrank_plugins]\n{name} = {name}_plugin\n")
    return module


def _run(site: Path, index: Path, log: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, ENV_INDEX: str(index), "IMPORT_LOG": str(log), "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


PROBE = """
import sys
from hf_lowrank_plugins.app.cli import main
code = main({argv!r})
print("IMPORTED", sorted(m for m in sys.modules if m.startswith("hf_lowrank_") and "." not in m))
"""


def _imported(result: subprocess.CompletedProcess[str]) -> set[str]:
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("IMPORTED"))
    return set(json.loads(line.split(" ", 1)[1].replace("'", '"')))


def test_list_and_a_named_method_import_only_what_they_need(tmp_path):
    site, index, log = tmp_path / "site", tmp_path / "index.json", tmp_path / "imports.log"
    site.mkdir()
    _distribution(site, "sleepy", sleep=1.0)
    list_probe = PROBE.format(argv=["list"])

    first = _run(site, index, log, list_probe)  # nothing known yet: every plugin is read, once
    assert "sleepy" in first.stdout and "hf_lowrank_galore" in _imported(first)
    assert log.read_text().split() == ["sleepy"]
    assert {d["name"] for e in json.loads(index.read_text())["entries"].values() for d in e} >= {"lora", "sleepy"}

    again = _run(site, index, log, list_probe)
    assert again.stdout.split("IMPORTED")[0] == first.stdout.split("IMPORTED")[0]  # the same table
    assert _imported(again) == {"hf_lowrank_plugins"}  # no plugin imported
    assert log.read_text().split() == ["sleepy"]

    dora = _run(site, index, log, PROBE.format(argv=["list", "--method", "dora"]))
    assert _imported(dora) == {"hf_lowrank_plugins", "hf_lowrank_dora", "hf_lowrank_lora"}
    assert log.read_text().split() == ["sleepy"]  # the sleeper's delay is paid by its own method only

    sleepy = _run(site, index, log, PROBE.format(argv=["list", "--method", "SLEEPY"]))
    assert "sleepy (sleepy-plugin 1.0): a third-party method" in sleepy.stdout
    assert _imported(sleepy) == {"hf_lowrank_plugins", "hf_lowrank_lora"}
    assert log.read_text().split() == ["sleepy", "sleepy"]


def test_an_edited_or_upgraded_plugin_is_read_again(tmp_path):
    site, index, log = tmp_path / "site", tmp_path / "index.json", tmp_path / "imports.log"
    site.mkdir()
    module = _distribution(site, "edited", summary="before")
    list_json = "from hf_lowrank_plugins.app.cli import main; main(['list', '--json'])"
    summaries = []
    for summary in ("before", "after"):
        module.write_text(SLEEPER.format(name="edited", summary=summary, sleep=0))
        os.utime(module, ns=(0, 10**18 + len(summaries)))  # a new mtime even on coarse clocks
        result = _run(site, index, log, list_json)
        assert result.returncode == 0, result.stderr
        summaries += [m["summary"] for m in json.loads(result.stdout)["methods"] if m["name"] == "edited"]
    assert summaries == ["before", "after"]
    entries = json.loads(index.read_text())["entries"]
    assert sum(key.startswith("edited=") for key in entries) == 1  # the earlier state is dropped


def test_an_observer_plugin_is_imported_for_every_method(tmp_path):
    site, index, log = tmp_path / "site", tmp_path / "index.json", tmp_path / "imports.log"
    site.mkdir()
    (site / "observer_plugin.py").write_text(
        textwrap.dedent(
            """
            import os
            import hf_lowrank_plugins as hlp
            open(os.environ["IMPORT_LOG"], "a").write("observer\\n")

            @hlp.hookimpl(hookwrapper=True)
            def init_adapter(model, config):
                yield
            """
        )
    )
    info = site / "observer_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: observer-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[hf_lowrank_plugins]\nobserver = observer_plugin\n")
    assert _run(site, index, log, PROBE.format(argv=["list"])).returncode == 0  # fills the index
    result = _run(site, index, log, PROBE.format(argv=["list", "--method", "lora"]))
    assert _imported(result) == {"hf_lowrank_plugins", "hf_lowrank_lora"}
    assert log.read_text().split() == ["observer", "observer"]  # remembered as declaring no method: still imported


def test_a_damaged_index_is_rebuilt_and_a_key_needs_a_locatable_source(tmp_path):
    path = tmp_path / "index.json"
    path.write_text("{not json")
    index = PluginIndex(path)
    assert index.lookup("anything") is None
    key = entry_key("lora", "hf_lowrank_lora.plugin", ("hf-lowrank-lora", "0.1.0"))
    assert key is not None and key.startswith("lora=hf_lowrank_lora.plugin|hf-lowrank-lora==0.1.0|")
    index.store(key, [{"name": "lora"}])
    index.save({key})
    assert PluginIndex(path).lookup(key) == [{"name": "lora"}]
    assert entry_key("ghost", "hf_lowrank_no_such_module", ("ghost", "1")) is None  # always imported
    assert entry_key("by-hand", None, ("", "")) is None
