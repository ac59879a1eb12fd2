"""Plugin discovery and method lookup, on top of a pluggy ``PluginManager``.

Plugins are found through the ``hf_lowrank_plugins`` entry-point group. Each entry point is loaded
on its own, so a plugin that fails to import is recorded with its error (``hf-lowrank list`` shows
it) and the others still load. Environment switches:

``HF_LOWRANK_DISABLE_PLUGIN_AUTOLOAD=1``
    load no entry points (register plugins by hand with :meth:`Registry.register`); the built-in
    ``full`` method (:mod:`.full`) is registered regardless.
``HF_LOWRANK_BLOCK_PLUGINS=name1,name2``
    skip the named entry points (e.g. a broken third-party plugin).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from importlib.metadata import entry_points
from typing import Any

import pluggy
from peft import PeftConfig

from . import hookspecs
from .errors import UnknownMethodError

ENTRY_POINT_GROUP = "hf_lowrank_plugins"
ENV_DISABLE_AUTOLOAD = "HF_LOWRANK_DISABLE_PLUGIN_AUTOLOAD"
ENV_BLOCK = "HF_LOWRANK_BLOCK_PLUGINS"

METHOD_HOOKS = ("init_adapter", "init_adapter_from_data", "wrap_optimizer", "post_train_merge")


@dataclass(frozen=True)
class MethodInfo:
    """What a plugin declares about one method (returned from ``describe_methods``).

    Attributes:
        name: the method name users type (``lora``, ``dora``, ...).
        config_class: its ``peft.PeftConfig`` subclass; ``config_class()`` must give sane defaults.
        summary: one line for ``hf-lowrank list``.
        supports_quantized_base: whether it can train on top of a 4-bit base.
        requires_quantized_base: whether the core must quantize the base before ``init_adapter``.
        quantizes_base_after_init: whether the method quantizes the base itself: for a 4-bit run
            the core then skips ``quantize_base`` and passes the settings to ``init_adapter``
            (QPiSSA must see full-precision W for its SVD and quantize only the residual).
        wraps_optimizer: whether it implements ``wrap_optimizer``; the callback then checks that
            the Trainer really used the core's optimizer factory, and says how to fix it if not.
        trains_adapter: whether the result is a PEFT adapter (``False`` for full-weight methods).
        plugin_name, distribution, version: filled in by the registry.
    """

    name: str
    config_class: type[PeftConfig]
    summary: str = ""
    supports_quantized_base: bool = True
    requires_quantized_base: bool = False
    quantizes_base_after_init: bool = False
    wraps_optimizer: bool = False
    trains_adapter: bool = True
    plugin_name: str = ""
    distribution: str = ""
    version: str = ""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly description (used by ``hf-lowrank list --json``)."""
        return {
            "name": self.name,
            "summary": self.summary,
            "distribution": self.distribution,
            "version": self.version,
            "config_class": f"{self.config_class.__module__}.{self.config_class.__qualname__}",
            "supports_quantized_base": self.supports_quantized_base,
            "wraps_optimizer": self.wraps_optimizer,
            "trains_adapter": self.trains_adapter,
        }


class Registry:
    """The set of installed plugins and the methods they provide.

    Use :func:`get_registry` for the process-wide instance; tests build their own.
    """

    def __init__(self, autoload: bool | None = None, blocked: Iterable[str] | None = None) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.failed: dict[str, str] = {}
        self._dist_of: dict[str, tuple[str, str]] = {}
        self._methods: dict[str, MethodInfo] | None = None
        if blocked is None:
            blocked = [b.strip() for b in os.environ.get(ENV_BLOCK, "").split(",") if b.strip()]
        self.blocked = set(blocked)
        for name in self.blocked:
            self.pm.set_blocked(name)
        # Built-in methods register whatever the autoload switch says, as pytest's built-in plugins do,
        # so the `full` baseline always exists; blocking it by name still works.
        from . import __version__, full

        self.register(full, name=full.NAME, distribution=("hf-lowrank-plugins", __version__))
        if autoload is None:
            autoload = os.environ.get(ENV_DISABLE_AUTOLOAD, "").lower() not in ("1", "true", "yes")
        if autoload:
            self.load_entry_points()

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Load and register every entry point of ``group``, recording failures instead of raising."""
        for ep in entry_points(group=group):
            if ep.name in self.blocked or self.pm.has_plugin(ep.name) or ep.name in self.failed:
                continue
            dist = (ep.dist.name, ep.dist.version) if ep.dist is not None else ("", "")
            try:
                self.register(ep.load(), name=ep.name, distribution=dist)
            except Exception as exc:  # a broken plugin must not take the others down
                self.failed[ep.name] = f"{type(exc).__name__}: {exc}"

    def register(self, plugin: object, name: str | None = None, distribution: tuple[str, str] = ("", "")) -> None:
        """Register a plugin object (usually a module of ``@hookimpl`` functions)."""
        name = self.pm.register(plugin, name=name)
        if name is None:  # blocked
            return
        self._dist_of[name] = distribution
        self._methods = None
        try:
            self._collect_methods()
        except Exception:
            self.pm.unregister(name=name)
            self._methods = None
            raise

    def _collect_methods(self) -> dict[str, MethodInfo]:
        methods: dict[str, MethodInfo] = {}
        for impl in self.pm.hook.describe_methods.get_hookimpls():
            plugin_name = self.pm.get_name(impl.plugin)
            dist, version = self._dist_of.get(plugin_name, ("", ""))
            for info in impl.function():
                if info.name in methods and methods[info.name].plugin_name != plugin_name:
                    raise ValueError(
                        f"method '{info.name}' is provided by both plugin '{methods[info.name].plugin_name}' "
                        f"and plugin '{plugin_name}'; block one with {ENV_BLOCK}"
                    )
                methods[info.name] = replace(info, plugin_name=plugin_name, distribution=dist, version=version)
        self._methods = dict(sorted(methods.items()))
        return self._methods

    @property
    def methods(self) -> dict[str, MethodInfo]:
        """Installed methods by name, sorted."""
        return self._methods if self._methods is not None else self._collect_methods()

    def get(self, name: str) -> MethodInfo:
        """The method called ``name``; raises :class:`UnknownMethodError` listing what is installed."""
        key = name.strip().lower().replace("-", "_")
        if key in self.methods:
            return self.methods[key]
        installed = ", ".join(self.methods) or "none"
        hint = difflib.get_close_matches(key, list(self.methods), n=1)
        maybe = f" Did you mean '{hint[0]}'?" if hint else ""
        broken = f" Plugins that failed to load: {', '.join(f'{k} ({v})' for k, v in self.failed.items())}." if self.failed else ""
        raise UnknownMethodError(
            f"unknown method '{name}'.{maybe} Installed methods: {installed}.{broken} "
            f"Install one with `pip install hf-lowrank-{key.replace('_', '-')}` (or `pip install -e plugins/{key}` "
            "in this repository); `hf-lowrank list` shows what is installed."
        )

    def method_for_config(self, config: PeftConfig) -> MethodInfo:
        """The method whose config class is exactly ``type(config)``, or the one it names."""
        for info in self.methods.values():
            if type(config) is info.config_class:
                return info
        name = getattr(config, "hf_lowrank_method", None)
        if name:
            return self.get(name)
        raise UnknownMethodError(
            f"no installed method uses config class {type(config).__name__}; installed methods: "
            f"{', '.join(f'{m.name} ({m.config_class.__name__})' for m in self.methods.values())}"
        )

    def call_method_hook(self, method: MethodInfo, hook_name: str, **kwargs: Any) -> Any:
        """Call a method hook with every other method's plugin left out (see :mod:`.hookspecs`)."""
        if hook_name not in METHOD_HOOKS:
            raise ValueError(f"{hook_name} is not a method hook; method hooks are {METHOD_HOOKS}")
        others = {m.plugin_name for m in self.methods.values()} - {method.plugin_name}
        caller = self.pm.subset_hook_caller(hook_name, remove_plugins=[self.pm.get_plugin(n) for n in others])
        return caller(**kwargs)


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
