"""Plugin discovery and method lookup, on top of a pluggy ``PluginManager``.

Plugins are found through the ``hf_lowrank_plugins`` entry-point group; the built-in ones
(:data:`BUILTIN_PLUGINS`, the ``full`` baseline) are a list of module names loaded the same way,
as pytest loads its own. Plugins cannot hurt each other:

* Plugins are imported when needed: ``train --method X`` imports X's plugin and the plugins that
  provide no method (observers of every method's hooks); ``hf-lowrank list`` imports none whose
  declarations the :mod:`.plugin_index` remembers. :attr:`Registry.methods` imports all. pluggy
  calls the last registered implementation first, so the order of plugins is not fixed: a plugin
  that must see a call before the method's own implementation answers it is a hookwrapper or
  ``tryfirst=True``.
* Each plugin is imported on its own; anything it raises, ``SystemExit`` included, is recorded
  with its error (``hf-lowrank list`` shows it) and the others still load.
* After registering, ``check_pending()`` runs: a misspelled hook (``init_adaptor``) is a load
  failure, not a silently ignored function.
* Two distributions using one entry-point name both load (the second under ``name@distribution``)
  and the clash is reported. Two plugins claiming one *method* name are both kept, but that method
  cannot run until one is blocked: :meth:`Registry.get` names both distributions and the switch.
* Hook results are checked (``init_adapter`` returns a module, ``wrap_optimizer`` an optimizer),
  and a hook that raises something other than our own errors is reported as one line naming the
  plugin and the hook (:class:`~hf_lowrank_plugins.errors.PluginError`).

Environment switches:

``HF_LOWRANK_DISABLE_PLUGIN_AUTOLOAD=1``
    load no entry points (register plugins by hand with :meth:`Registry.register`); the built-in
    plugins are registered regardless.
``HF_LOWRANK_BLOCK_PLUGINS=name1,name2``
    skip the named entry points; a name may be an entry-point name, a distribution name, or
    ``distribution:entry-point`` to pick one of two clashing entry points.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

from . import hookspecs
from .errors import ConfigError, LowRankError, PluginError, UnknownMethodError
from .hookspecs import HOOKS, METHOD_HOOKS, TRAINER_HOOKS
from .plugin_index import PluginIndex, entry_key, index_path
from .types import MethodInfo

if TYPE_CHECKING:
    from peft import PeftConfig

ENTRY_POINT_GROUP = "hf_lowrank_plugins"
ENV_DISABLE_AUTOLOAD = "HF_LOWRANK_DISABLE_PLUGIN_AUTOLOAD"
ENV_BLOCK = "HF_LOWRANK_BLOCK_PLUGINS"
#: Plugins of the core itself: (registered name, module), loaded like any entry point.
BUILTIN_PLUGINS = (("full", "hf_lowrank_plugins.builtin.full"),)
CORE_DISTRIBUTION = "hf-lowrank-plugins"


def _core_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(CORE_DISTRIBUTION)
    except PackageNotFoundError:  # pragma: no cover - a source tree without install
        return "0"


_Claim = TypeVar("_Claim")


def split_claims(
    claims: Iterable[_Claim], name_of: Callable[[_Claim], str]
) -> tuple[dict[str, _Claim], dict[str, list[_Claim]]]:
    """Method declarations grouped by name: those one plugin claims (by name), and the conflicts (a
    name several plugins claim, with every claim in the order found)."""
    by_name: dict[str, list[_Claim]] = {}
    for claim in claims:
        by_name.setdefault(name_of(claim), []).append(claim)
    unique = {name: found[0] for name, found in by_name.items() if len(found) == 1}
    return unique, {name: found for name, found in by_name.items() if len(found) > 1}


def method_key(name: str) -> str:
    """How a typed method name is matched: ``LoRA-GA`` selects ``lora_ga``."""
    return name.strip().lower().replace("-", "_")


@dataclass(frozen=True)
class _Pending:
    """A discovered plugin not imported yet."""

    name: str
    load: Callable[[], object]
    distribution: tuple[str, str]
    index_key: str | None


class Registry:
    """The set of installed plugins and the methods they provide.

    Use :func:`get_registry` for the process-wide instance; tests build their own.

    Attributes:
        failed: plugin name -> why it did not load (import error, bad hook, bad declaration).
        conflicts: method name -> the plugins that all claim it (such a method cannot run).
        clashes: entry-point name -> the distributions that all use it (all loaded, renamed).
    """

    def __init__(self, autoload: bool | None = None, blocked: Iterable[str] | None = None) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.failed: dict[str, str] = {}
        self.conflicts: dict[str, list[MethodInfo]] = {}
        self.clashes: dict[str, list[str]] = {}
        self._dist_of: dict[str, tuple[str, str]] = {}
        self._methods: dict[str, MethodInfo] | None = None
        self._pending: dict[str, _Pending] = {}
        self._discovered: list[str] = []  # plugin names in the order found, for a stable listing
        self._index = PluginIndex(index_path())
        self._index_keys: dict[str, str | None] = {}
        if blocked is None:
            blocked = [b.strip() for b in os.environ.get(ENV_BLOCK, "").split(",") if b.strip()]
        self.blocked = set(blocked)
        for name in self.blocked:
            self.pm.set_blocked(name)  # also refuses plugins registered by hand under that name
        for name, module in BUILTIN_PLUGINS:
            if name not in self.blocked:
                core = (CORE_DISTRIBUTION, _core_version())
                self._discover(name, functools.partial(importlib.import_module, module), core, module)
        if autoload is None:
            autoload = os.environ.get(ENV_DISABLE_AUTOLOAD, "").lower() not in ("1", "true", "yes")
        if autoload:
            self.discover_entry_points()

    # ------------------------------------------------------------------ loading

    def discover_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Find every entry point of ``group``; each is imported when a command needs it."""
        seen: dict[str, str] = {name: CORE_DISTRIBUTION for name, _ in BUILTIN_PLUGINS}
        for ep in entry_points(group=group):
            dist = (ep.dist.name, ep.dist.version) if ep.dist is not None else ("", "")
            if {ep.name, dist[0], f"{dist[0]}:{ep.name}"} & self.blocked:
                continue
            name = ep.name
            if name in seen:
                if seen[name] == dist[0]:
                    continue  # the same distribution seen twice on sys.path
                self.clashes.setdefault(ep.name, [seen[ep.name]]).append(dist[0])
                name = f"{ep.name}@{dist[0]}"
            seen[name] = dist[0]
            if self.pm.has_plugin(name) or name in self.failed or name in self._pending:
                continue
            self._discover(name, ep.load, dist, getattr(ep, "value", None))

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Find and import every entry point of ``group``, recording failures instead of raising."""
        self.discover_entry_points(group)
        self._load_where(lambda declared: True)

    def _discover(
        self, name: str, load: Callable[[], object], distribution: tuple[str, str], value: str | None
    ) -> None:
        self._pending[name] = _Pending(name, load, distribution, entry_key(name, value, distribution))
        self._discovered.append(name)

    def _load_where(self, wanted: Callable[[list[dict[str, Any]] | None], bool]) -> None:
        """Import the pending plugins whose remembered declarations (``None``: unknown) are ``wanted``."""
        chosen = [p for p in self._pending.values() if wanted(self._index.lookup(p.index_key))]
        for pending in chosen:
            del self._pending[pending.name]
            self._index_keys[pending.name] = pending.index_key
            self._load(pending.name, pending.load, pending.distribution)
            if self.pm.has_plugin(pending.name):
                declared = [info.as_dict() for info in self._declared_methods(pending.name)]
                self._index.store(pending.index_key, declared)
        if chosen:
            current = {k for k in [*self._index_keys.values(), *(p.index_key for p in self._pending.values())] if k}
            self._index.save(current)

    def _load_needed_for(self, key: str) -> None:
        """Import the plugins that declare method ``key``, those that declare none (observers of
        every method) and those whose declarations are not known yet."""
        self._load_where(lambda declared: not declared or any(method_key(d.get("name", "")) == key for d in declared))

    def _load(self, name: str, load: Callable[[], object], distribution: tuple[str, str]) -> None:
        try:
            plugin = load()
        except (Exception, SystemExit) as exc:  # a broken plugin must not take the others (or the process) down
            self.failed[name] = f"{type(exc).__name__} on import: {exc}"
            return
        try:
            self.register(plugin, name=name, distribution=distribution)
        except LowRankError as exc:
            self.failed[name] = str(exc)

    def register(self, plugin: object, name: str | None = None, distribution: tuple[str, str] = ("", "")) -> None:
        """Register a plugin object (usually a module of ``@hookimpl`` functions).

        Raises :class:`PluginError` (and leaves the plugin out) when it implements a hook that
        does not exist or declares its methods wrongly.
        """
        try:
            name = self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin '{name}' is invalid: {exc}") from None
        if name is None:  # blocked
            return
        self._dist_of[name] = distribution
        try:
            self.pm.check_pending()
            self._declared_methods(name)
        except (pluggy.PluginValidationError, PluginError) as exc:
            self.pm.unregister(name=name)
            self._dist_of.pop(name, None)
            message = str(exc)
            if isinstance(exc, pluggy.PluginValidationError):
                message = (
                    f"plugin '{name}' implements a hook that does not exist: {exc} (see hf_lowrank_plugins.hookspecs)"
                )
            raise PluginError(message) from None
        self._methods = None

    def _declared_methods(self, plugin_name: str) -> list[MethodInfo]:
        """What ``plugin_name``'s ``describe_methods`` returns, checked, with the derived fields filled in."""
        plugin = self.pm.get_plugin(plugin_name)
        impls = [i for i in self.pm.hook.describe_methods.get_hookimpls() if i.plugin is plugin]
        if not impls:
            return []
        try:
            declared = impls[0].function()
        except (Exception, SystemExit) as exc:
            raise PluginError(
                f"plugin '{plugin_name}' failed in describe_methods: {type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(declared, (list, tuple)) or not all(isinstance(i, MethodInfo) for i in declared):
            raise PluginError(
                f"plugin '{plugin_name}': describe_methods must return a list of MethodInfo, got {declared!r}"
            )
        hooks = frozenset(
            h for h in METHOD_HOOKS if any(i.plugin is plugin for i in getattr(self.pm.hook, h).get_hookimpls())
        )
        from peft import PeftConfig  # here, not at the top: `hf-lowrank list` from the index needs no PEFT

        dist, version = self._dist_of.get(plugin_name, ("", ""))
        out = []
        for info in declared:
            if not isinstance(info.name, str) or method_key(info.name) != info.name or not info.name.isidentifier():
                raise PluginError(
                    f"plugin '{plugin_name}': method name {info.name!r} cannot be typed as it is declared (names are "
                    f"matched in lower case with '-' read as '_'); declare it as {method_key(str(info.name))!r}"
                )
            if not (isinstance(info.config_class, type) and issubclass(info.config_class, PeftConfig)):
                raise PluginError(
                    f"plugin '{plugin_name}': method '{info.name}' needs a peft.PeftConfig subclass as config_class"
                )
            out.append(
                replace(
                    info,
                    plugin_name=plugin_name,
                    distribution=dist,
                    version=version,
                    hooks=hooks,
                    trainer_hooks=hooks & TRAINER_HOOKS,
                )
            )
        return out

    def _collect_methods(self) -> dict[str, MethodInfo]:
        declared = [info for name, _ in self.pm.list_name_plugin() for info in self._declared_methods(name)]
        methods, self.conflicts = split_claims(declared, lambda info: info.name)
        self._methods = dict(sorted(methods.items()))
        return self._methods

    # ------------------------------------------------------------------ lookup

    @property
    def methods(self) -> dict[str, MethodInfo]:
        """Installed methods by name, sorted (methods claimed by two plugins are in :attr:`conflicts`).

        Imports every plugin; :meth:`get` and :meth:`declarations` import only what they need.
        """
        self._load_where(lambda declared: True)
        return self._registered_methods()

    def _registered_methods(self) -> dict[str, MethodInfo]:
        """The methods of the plugins imported so far."""
        return self._methods if self._methods is not None else self._collect_methods()

    def declarations(self) -> list[dict[str, Any]]:
        """Every installed method as ``hf-lowrank list --json`` describes it (``MethodInfo.as_dict()``),
        by name; two plugins' entries under one name are a conflict.

        Only plugins the index does not remember are imported.
        """
        self._load_where(lambda declared: declared is None)
        by_hand = [name for name, _ in self.pm.list_name_plugin() if name not in self._discovered]
        found: list[dict[str, Any]] = []
        for name in [*self._discovered, *by_hand]:
            if name in self._pending:
                found += self._index.lookup(self._pending[name].index_key) or []
            elif self.pm.has_plugin(name):
                found += [info.as_dict() for info in self._declared_methods(name)]
        return sorted(found, key=lambda d: str(d.get("name")))  # stable: two claims keep the order found

    def find(self, name: str) -> MethodInfo | None:
        """The method called ``name``, or ``None`` when none (or more than one plugin) provides it.

        Imports only the plugins that can provide it (see :meth:`get`).
        """
        key = method_key(name)
        self._load_needed_for(key)
        return self._registered_methods().get(key)

    def get(self, name: str) -> MethodInfo:
        """The method called ``name``; raises :class:`UnknownMethodError` listing what is installed.

        Imports the plugins that declare ``name``, the plugins that declare no method (observers of
        every method's hooks) and those the index does not know; all of them when no plugin has it.
        """
        key = method_key(name)
        found = self.find(key)
        if found is not None:
            return found
        # an unknown name: every plugin is imported, for the listing and the hint
        methods = self._registered_methods() if key in self.conflicts else self.methods
        if key in methods:
            return methods[key]
        if key in self.conflicts:
            claimers = " and ".join(
                f"plugin '{i.plugin_name}' ({i.distribution or 'registered by hand'})" for i in self.conflicts[key]
            )
            raise ConfigError(
                f"method '{key}' is provided by both {claimers}; block one with "
                f"{ENV_BLOCK}={self.conflicts[key][-1].plugin_name} (or uninstall it)"
            )
        installed = ", ".join(methods) or "none"
        hint = difflib.get_close_matches(key, list(methods), n=1)
        maybe = f" Did you mean '{hint[0]}'?" if hint else ""
        broken = (
            f" Plugins that failed to load: {', '.join(f'{k} ({v})' for k, v in self.failed.items())}."
            if self.failed
            else ""
        )
        raise UnknownMethodError(
            f"unknown method '{name}'.{maybe} Installed methods: {installed}.{broken} "
            f"Install one with `pip install hf-lowrank-{key.replace('_', '-')}` (or `pip install -e plugins/{key}` "
            "in this repository); `hf-lowrank list` shows what is installed."
        )

    def reference(self) -> MethodInfo | None:
        """The method other methods are compared against by default (the one declaring ``reference``)."""
        return next((m for m in self.methods.values() if m.reference), None)

    def method_for_config(self, config: PeftConfig) -> MethodInfo:
        """The method whose config class is exactly ``type(config)``, the one it names, or the one whose
        config class it subclasses."""
        name = getattr(config, "hf_lowrank_method", None)
        paths = {f"{cls.__module__}.{cls.__qualname__}" for cls in type(config).__mro__}
        # only the plugins that declare this class or a base of it (or the named method), those that declare no
        # method, and those the index does not know yet
        self._load_where(
            lambda declared: (
                not declared
                or any(d.get("config_class") in paths or (name and d.get("name") == method_key(name)) for d in declared)
            )
        )
        registered = self._registered_methods().values()
        for info in registered:
            if type(config) is info.config_class:
                return info
        if name:
            return self.get(name)
        for cls in type(config).__mro__:  # a user's subclass of a method's config belongs to that method
            found = next((info for info in registered if info.config_class is cls), None)
            if found is not None:
                return found
        peft_type = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", "")))
        for info in self.methods.values():
            if info.plain_peft_type is not None and info.plain_peft_type == peft_type:
                return info
        raise UnknownMethodError(
            f"no installed method uses config class {type(config).__name__}; installed methods: "
            f"{', '.join(f'{m.name} ({m.config_class.__name__})' for m in self.methods.values())}"
        )

    # ------------------------------------------------------------------ calling

    def call_method_hook(
        self, method: MethodInfo, hook_name: str, check: Callable[[Any], str | None] | None = None, **kwargs: Any
    ) -> Any:
        """Call a method hook with every other method's plugin left out (see :mod:`.hookspecs`).

        The answer is checked against the hook's contract (its type, then ``check``, which returns
        what is wrong with an answer or ``None``); an exception other than our own
        (:class:`LowRankError`) becomes a :class:`PluginError` naming the plugin that raised and the hook.
        """
        if hook_name not in METHOD_HOOKS:
            raise ValueError(f"{hook_name} is not a method hook; method hooks are {METHOD_HOOKS}")
        owners = {m.plugin_name for m in self._registered_methods().values()} | {
            i.plugin_name for c in self.conflicts.values() for i in c
        }
        others = owners - {method.plugin_name}
        caller = self.pm.subset_hook_caller(hook_name, remove_plugins=[self.pm.get_plugin(n) for n in others])
        try:
            result = caller(**kwargs)
        except LowRankError:
            raise
        except Exception as exc:
            culprit = _raised_in(caller.get_hookimpls(), exc) or method.plugin_name
            distribution = self._dist_of.get(culprit, ("", ""))[0] or "registered by hand"
            raise PluginError(
                f"plugin '{culprit}' ({distribution}) failed in {hook_name} for method '{method.name}': "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if result is None:
            return None
        expected = HOOKS[hook_name].returns
        wrong = (
            f"{type(result).__name__}, expected {' or '.join(t.__name__ for t in expected)} (or None)"
            if not isinstance(result, expected)
            else (check(result) if check is not None else None)
        )
        if wrong:
            # a first answer carries no name: with observers implementing the hook, any of them may have given it
            answering = [f"'{i.plugin_name}'" for i in reversed(caller.get_hookimpls())]
            who = f"plugin {answering[0]}" if len(answering) == 1 else f"one of plugins {', '.join(answering)}"
            raise PluginError(f"{who}: {hook_name} for method '{method.name}' returned {wrong}")
        return result


def _raised_in(impls: list[pluggy.HookImpl], exc: BaseException) -> str | None:
    """The plugin whose implementation ``exc`` came out of: the outermost one on its traceback.

    Several plugins answer one hook (the method's, and observers that wrap every method), so the
    method's own plugin is not necessarily the one that failed.
    """
    codes = {impl.function.__code__: impl.plugin_name for impl in impls if hasattr(impl.function, "__code__")}
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in codes:
            return codes[tb.tb_frame.f_code]
        tb = tb.tb_next
    return None


_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loading entry points on first use."""
    global _registry
    if _registry is None:
        _registry = Registry()
    return _registry


def set_registry(registry: Registry | None) -> None:
    """Replace the process-wide registry (``None`` reloads on next use). Meant for tests and embedding."""
    global _registry
    _registry = registry
