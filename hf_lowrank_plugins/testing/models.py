"""Tiny models built from a config, one per architecture family the conformance kit covers.

Each :class:`ModelCase` builds a deterministic model small enough to train in well under a second,
a batch to compare outputs on, and a dataset the ``Trainer`` can train on. Dropout is off so
outputs are comparable between train-mode runs and resumes. Nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

VOCAB = 128
SEQ_LEN = 16


def kit_devices() -> tuple[str, ...]:
    """The devices the kit's checks run on: the CPU, and CUDA when a GPU is present.

    ``HF_LOWRANK_TEST_DEVICES`` (comma-separated, e.g. ``cuda``) narrows or names them; a device
    named there but absent fails the run rather than being skipped silently.
    """
    named = os.environ.get("HF_LOWRANK_TEST_DEVICES")
    if named:
        devices = tuple(d.strip() for d in named.split(",") if d.strip())
        if "cuda" in devices and not torch.cuda.is_available():
            raise RuntimeError("HF_LOWRANK_TEST_DEVICES names cuda, but torch sees no CUDA device")
        return devices
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def kit_models(cases: tuple[ModelCase, ...]) -> tuple[ModelCase, ...]:
    """The model cases the kit's checks run on: ``cases``, or those ``HF_LOWRANK_TEST_MODELS`` names
    (comma-separated, e.g. ``llama`` for ``make test-fast``); a name not among them fails the run."""
    named = [n.strip() for n in os.environ.get("HF_LOWRANK_TEST_MODELS", "").split(",") if n.strip()]
    if not named:
        return cases
    unknown = sorted(set(named) - {case.name for case in cases})
    if unknown:
        raise RuntimeError(
            f"HF_LOWRANK_TEST_MODELS names {', '.join(unknown)}; the matrix has {', '.join(c.name for c in cases)}"
        )
    return tuple(case for case in cases if case.name in named)


class TokenDataset(torch.utils.data.Dataset):
    """Learnable token sequences (8 patterns repeated), with labels for a causal, seq2seq or classifier model."""

    def __init__(self, n: int = 64, seq_len: int = SEQ_LEN, seed: int = 0, num_labels: int | None = None) -> None:
        generator = torch.Generator().manual_seed(seed)
        patterns = torch.randint(0, VOCAB, (8, seq_len), generator=generator)
        pick = torch.randint(0, 8, (n,), generator=generator)
        self.x = patterns[pick]
        # a classifier learns which half of the patterns a sequence comes from
        self.y = (pick % 2) if num_labels else None

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.y is not None:
            return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.y[i]}
        return {"input_ids": self.x[i], "labels": self.x[i]}


@dataclass(frozen=True)
class ModelCase:
    """One architecture of the conformance matrix.

    Attributes:
        name: short id used in test ids (``llama``, ``gpt2``, ``t5``, ``bert_cls``).
        build_model: builds the model from its config (call with a seed).
        auto_class: the ``transformers`` class name plain code loads the saved base with.
        num_labels: set for sequence classifiers (the dataset then yields class labels).
    """

    name: str
    build_model: Callable[[], nn.Module]
    auto_class: str
    num_labels: int | None = None

    def build(self, seed: int = 0) -> nn.Module:
        """A fresh model with deterministic weights, in eval mode."""
        torch.manual_seed(seed)
        return self.build_model().eval()

    def batch(self, seed: int = 1) -> dict[str, torch.Tensor]:
        """Inputs to compare outputs on (decoder inputs included for seq2seq models)."""
        ids = torch.randint(1, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(seed))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.auto_class.endswith("ForConditionalGeneration"):
            batch["decoder_input_ids"] = ids
        return batch

    def dataset(self, n: int = 64) -> TokenDataset:
        """A small training set the Trainer can use as it is."""
        return TokenDataset(n=n, num_labels=self.num_labels)

    def __str__(self) -> str:
        return self.name


def output(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The model's logits on ``batch`` in fp32 on the CPU, without gradients (run where the model is)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|``: the tolerance measure of the kit."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


#: The shape of every tiny decoder of the kit: 2 layers, 64 wide, grouped-query attention.
TINY_DECODER: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

#: The shape of the tiny BERT-family classifiers: 2 layers, 64 wide, two labels, no dropout.
_TINY_ENCODER: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    num_labels=2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**TINY_DECODER))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    # token ids and num_labels are PreTrainedConfig keywords the config classes' own signatures do not list
    config: dict[str, Any] = dict(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(T5Config(**config))


def _bert_cls() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config: dict[str, Any] = dict(_TINY_ENCODER, max_position_embeddings=64)
    return BertForSequenceClassification(BertConfig(**config))


def _decoder(config_class: str, model_class: str, **extra: Any) -> Callable[[], nn.Module]:
    """A 2-layer, 64-wide causal LM of another family, built from its config like :func:`_llama`."""

    def build() -> nn.Module:
        import transformers

        config: dict[str, Any] = dict(TINY_DECODER, **extra)
        return getattr(transformers, model_class)(getattr(transformers, config_class)(**config))

    return build


def _roberta_cls() -> nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    # RoBERTa's classifier is a module of two linear layers (dense, out_proj): the whole head trains in full
    config: dict[str, Any] = dict(_TINY_ENCODER, max_position_embeddings=80, pad_token_id=1)
    return RobertaForSequenceClassification(RobertaConfig(**config))


LLAMA = ModelCase("llama", _llama, "LlamaForCausalLM")
GPT2 = ModelCase("gpt2", _gpt2, "GPT2LMHeadModel")
T5 = ModelCase("t5", _t5, "T5ForConditionalGeneration")
BERT_CLS = ModelCase("bert_cls", _bert_cls, "BertForSequenceClassification", num_labels=2)
#: The default matrix: a Llama-shaped causal LM, GPT-2 (``Conv1D`` layers), an encoder-decoder, a classifier.
MODEL_CASES = (LLAMA, GPT2, T5, BERT_CLS)
QWEN2 = ModelCase("qwen2", _decoder("Qwen2Config", "Qwen2ForCausalLM"), "Qwen2ForCausalLM")
MISTRAL = ModelCase("mistral", _decoder("MistralConfig", "MistralForCausalLM"), "MistralForCausalLM")
#: Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj
PHI3 = ModelCase(
    "phi3", _decoder("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, bos_token_id=1, eos_token_id=2), "Phi3ForCausalLM"
)
GEMMA = ModelCase("gemma", _decoder("GemmaConfig", "GemmaForCausalLM", head_dim=16), "GemmaForCausalLM")
ROBERTA_CLS = ModelCase("roberta_cls", _roberta_cls, "RobertaForSequenceClassification", num_labels=2)
#: More families the project supports; ``tests/test_architectures.py`` runs every method on them.
MORE_MODEL_CASES = (QWEN2, MISTRAL, PHI3, GEMMA, ROBERTA_CLS)
