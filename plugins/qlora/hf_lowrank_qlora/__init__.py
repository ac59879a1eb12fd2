"""QLoRA for hf-lowrank-plugins: ``attach(model, "qlora")``.

The 4-bit base itself is the core's quantization service (:mod:`hf_lowrank_plugins.quantization`),
which every method uses through ``attach(model, "<method>", load_in_4bit=True)``.
"""

from importlib.metadata import version

from .config import QLoraConfig

__all__ = ["QLoraConfig"]
__version__ = version("hf-lowrank-qlora")  # the version lives in pyproject.toml only
