"""Shared fixtures: tiny models built from a config (no downloads) and a tiny LM dataset."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 128


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A 2-layer Llama small enough to train in milliseconds."""
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def make_tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    """A fresh tiny causal LM with deterministic weights."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_llama_config(**overrides)).eval()


class TokenDataset(torch.utils.data.Dataset):
    """Random but learnable token sequences (a repeated pattern), labels = inputs."""

    def __init__(self, n: int = 64, seq_len: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        base = torch.randint(0, VOCAB, (8, seq_len), generator=g)
        self.x = base[torch.randint(0, 8, (n,), generator=g)]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture
def batch():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def token_dataset():
    return TokenDataset()


def logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """fp32 logits without grad."""
    with torch.no_grad():
        return model(input_ids=batch).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a-b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def training_args(output_dir, **overrides):
    """Small, quiet, deterministic TrainingArguments."""
    from transformers import TrainingArguments

    kw = dict(output_dir=str(output_dir), max_steps=12, per_device_train_batch_size=8, learning_rate=5e-3,
              logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    kw.update(overrides)
    return TrainingArguments(**kw)
