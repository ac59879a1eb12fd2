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


@pytest.fixture(scope="session")
def smol_dir():
    """The real SmolLM2-135M-Instruct checkpoint (converted once from the packaged GGUF file)."""
    from hf_lowrank_plugins.app.data import default_model_dir

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


PLAIN_PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
with torch.no_grad():
    out = model(input_ids=torch.load(sys.argv[3])).logits
torch.save(out, sys.argv[4])
assert not any(m.startswith("hf_lowrank") for m in sys.modules), "our package was imported"
print(type(model.peft_config["default"]).__name__)
"""


def plain_peft_logits(base_dir, adapter_dir, batch: torch.Tensor, tmp_path) -> tuple[torch.Tensor, str]:
    """Logits of ``adapter_dir`` on ``base_dir`` loaded by plain PEFT in a process that never imports
    our package, and the config class name PEFT used."""
    import subprocess
    import sys

    torch.save(batch, tmp_path / "batch.pt")
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT_SCRIPT, str(base_dir), str(adapter_dir), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, check=True,
    )
    return torch.load(tmp_path / "out.pt"), proc.stdout.strip().splitlines()[-1]
