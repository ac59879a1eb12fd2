"""The ``hf-lowrank`` application: command line, training runner, data loading, ``compare`` and plots.

Built on the library (:mod:`hf_lowrank_plugins`) like any other user of it: nothing in the library
imports this package, so ``import hf_lowrank_plugins`` never pulls in matplotlib, gguf, the
embedded model or the CLI.
"""
