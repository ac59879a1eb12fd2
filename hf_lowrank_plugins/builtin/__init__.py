"""Plugins shipped with the core, registered by name like any installed plugin (see ``registry.BUILTIN_PLUGINS``)."""
