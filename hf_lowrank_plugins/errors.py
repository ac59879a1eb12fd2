"""Errors a user can act on. Each message names the problem and the fix in one line."""

from __future__ import annotations


class LowRankError(Exception):
    """Base class: bad input or an incompatible combination, never a bug in our code.

    The CLI prints these as one line without a traceback and exits non-zero.
    """


class UnknownMethodError(LowRankError, KeyError):
    """A method name that no installed plugin provides."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class ConfigError(LowRankError, ValueError):
    """A configuration value that cannot work (rank too large, unknown option, ...)."""


class TargetError(ConfigError):
    """Target modules that match nothing, or that the method cannot adapt."""


class IncompatibleError(LowRankError, ValueError):
    """Two things that cannot be combined (e.g. a 4-bit base with full fine-tuning)."""


class PluginError(LowRankError):
    """A plugin that is broken: fails to load, implements an unknown hook, or fails inside a hook.

    Not the user's input: the CLI reports it as one line naming the plugin and the hook, and exits 1.
    """


class DivergenceError(LowRankError):
    """Training produced a non-finite loss or weight; nothing it trained is exported.

    Not bad input: the CLI exits 1 and names the step and the remedy.
    """
