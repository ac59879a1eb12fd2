"""pytest fixtures of the kit: load with ``-p hf_lowrank_plugins.testing.fixtures`` (this repository's
pytest configuration does) or ``pytest_plugins = ["hf_lowrank_plugins.testing.fixtures"]`` in a root conftest."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from .helpers import VOCAB, TokenDataset, make_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are built from configs: nothing is downloaded
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the plugin index is a per-user cache: a test session keeps its own (and starts with none)
os.environ.setdefault(
    "HF_LOWRANK_PLUGIN_INDEX", os.path.join(tempfile.mkdtemp(prefix="hf-lowrank-"), "plugin-index.json")
)


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    """A fresh tiny Llama (see :func:`.helpers.make_tiny_model`)."""
    return make_tiny_model()


@pytest.fixture
def batch() -> torch.Tensor:
    """``input_ids`` of shape (2, 16) to compare outputs on."""
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def token_dataset() -> TokenDataset:
    """64 learnable sequences with labels, for the Trainer."""
    return TokenDataset()
