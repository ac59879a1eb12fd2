"""Packaging: every distribution declares its license and ships the text; the core declares what it imports,
with floors no lower than its dependencies' own needs."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions, requires
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = [ROOT, *sorted((ROOT / "plugins").iterdir()), ROOT / "examples" / "loraplus"]


def _project(folder: Path) -> dict:
    return tomllib.loads((folder / "pyproject.toml").read_text())["project"]


def _requirements(project: dict) -> dict[str, Requirement]:
    listed = [
        *project["dependencies"],
        *(r for extra in project.get("optional-dependencies", {}).values() for r in extra),
    ]
    return {_normalised(Requirement(r).name): Requirement(r) for r in listed}


def _normalised(name: str) -> str:
    """A distribution name as PEP 503 compares them (``huggingface_hub`` is ``huggingface-hub``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("folder", DISTRIBUTIONS, ids=lambda f: f.name)
def test_every_distribution_declares_apache_2_and_ships_its_text(folder):
    assert _project(folder)["license"] == {"text": "Apache-2.0"}
    assert (folder / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()


def _floor(requirement: Requirement) -> tuple[int, ...]:
    floors = [s.version for s in requirement.specifier if s.operator in (">=", "==", "~=")]
    assert floors, f"{requirement} has no floor"
    parts = [int(part) for part in re.findall(r"\d+", floors[0])[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


@pytest.mark.parametrize("name", ["torch", "accelerate", "safetensors", "pyyaml"])
def test_the_cores_floors_are_what_transformers_itself_needs(name):
    """A floor below transformers' own lets pip pick a version that transformers cannot run with."""
    needed = [Requirement(r) for r in requires("transformers") or [] if Requirement(r).name.lower() == name]
    ours = _requirements(_project(ROOT))[name]
    assert needed, f"transformers no longer requires {name}: revisit this floor"
    assert _floor(ours) >= max(_floor(r) for r in needed), (str(ours), [str(r) for r in needed])


def test_every_third_party_module_the_core_imports_is_declared():
    """Imports anywhere in the core (module level or inside functions) map to a declared distribution."""
    declared = set(_requirements(_project(ROOT))) | {"hf-lowrank-plugins", "pytest"}  # pytest: the kit's `test` extra
    owners = packages_distributions()
    missing = {}
    for file in (ROOT / "hf_lowrank_plugins").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "hf_lowrank_plugins":
                    continue
                distributions = {_normalised(d) for d in owners.get(top, [top])}
                if not distributions & declared:
                    missing.setdefault(top, []).append(file.relative_to(ROOT).as_posix())
    assert not missing, missing


def test_the_floors_file_pins_exactly_the_declared_floors():
    """`make test-floors` installs tests/floors.txt; it must be the floors pyproject declares (torch aside:
    its floor has no CPU wheel here), or the floors it tests are not the ones users get."""
    pinned = {}
    for line in (ROOT / "tests" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            pinned[_normalised(requirement.name)] = _floor(requirement)
    declared = {_normalised(Requirement(r).name): _floor(Requirement(r)) for r in _project(ROOT)["dependencies"]}
    assert set(pinned) == set(declared)
    assert {name: floor for name, floor in pinned.items() if name != "torch"} == {
        name: floor for name, floor in declared.items() if name != "torch"
    }
