"""Fixtures of the application's tests: the real embedded model, a saved tiny model with its tokenizer, a text file.

The kit's own fixtures (``tiny_model``, ``batch``, ``token_dataset``) come from
``hf_lowrank_plugins.testing.fixtures`` (loaded by the pytest configuration in pyproject.toml).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_lowrank_plugins.testing.helpers import tiny_llama_config


@pytest.fixture(scope="session")
def smol_dir():
    """The real SmolLM2-135M-Instruct checkpoint (converted once from the packaged GGUF file)."""
    from hf_lowrank_plugins.app.embedded import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_dir):
    """A saved 2-layer Llama with SmolLM2's tokenizer, so CLI runs take seconds."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    """A small plain-text dataset."""
    path = tmp_path / "data.txt"
    path.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(200)))
    return path
