"""Small building blocks for a method's own tests: a tiny Llama, logits, quiet Trainer arguments, plain PEFT.

The conformance matrix (:mod:`.conformance`) covers the contract; these serve the tests a method
adds for what only it does (PiSSA's SVD, GaLore's projector, ...).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .models import TINY_DECODER, VOCAB, TokenDataset, rel_err

__all__ = [
    "VOCAB",
    "TokenDataset",
    "logits",
    "make_tiny_model",
    "plain_peft_logits",
    "rel_err",
    "tiny_llama_config",
    "training_args",
]


#: ``torchrun --standalone --nproc_per_node 2`` run by this interpreter: the two-process launches of the tests
#: (on a CPU the processes form a gloo group)
TORCHRUN_TWO_PROCESSES = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


def tiny_llama_config(**overrides: Any) -> Any:
    """A 2-layer Llama config (64 wide) small enough to train in milliseconds."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_DECODER, **overrides})


def make_tiny_model(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A fresh tiny causal LM with deterministic weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_llama_config(**overrides)).eval()


def logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """fp32 logits of a causal LM on ``input_ids``, without gradients."""
    with torch.no_grad():
        return model(input_ids=batch).logits.float()


def training_args(output_dir: str | Path, **overrides: Any) -> Any:
    """Small, quiet, deterministic ``TrainingArguments`` (12 steps of 8, lr 5e-3, CPU, no saving)."""
    from transformers import TrainingArguments

    kw: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
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


def plain_peft_logits(
    base_dir: str | Path, adapter_dir: str | Path, batch: torch.Tensor, tmp_path: Path
) -> tuple[torch.Tensor, str]:
    """Logits of ``adapter_dir`` on the causal LM ``base_dir`` loaded by plain PEFT in a process that
    never imports this package, and the config class name PEFT used."""
    torch.save(batch, tmp_path / "batch.pt")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            PLAIN_PEFT_SCRIPT,
            str(base_dir),
            str(adapter_dir),
            str(tmp_path / "batch.pt"),
            str(tmp_path / "out.pt"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return torch.load(tmp_path / "out.pt"), proc.stdout.strip().splitlines()[-1]
