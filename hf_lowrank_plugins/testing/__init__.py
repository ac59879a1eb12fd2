"""The conformance kit: the contract every method meets, as tests a plugin author reuses.

Subclass :class:`MethodConformance` in your plugin's tests (see :mod:`.conformance`); the pieces
(:mod:`.models` for tiny models of several architectures, :mod:`.contract` for the checks) work on
their own too. Needs ``pytest`` (the ``test`` extra); nothing here is imported by the library.
"""

import pytest

# an installed package's asserts are not rewritten unless registered before import: without this a
# failing check prints a bare AssertionError instead of the values compared
pytest.register_assert_rewrite("hf_lowrank_plugins.testing.conformance", "hf_lowrank_plugins.testing.contract")

from .conformance import CHECKS, MethodConformance  # noqa: E402
from .contract import (  # noqa: E402
    IDENTITY_TOL,
    MERGE_TOL,
    PLAIN_PEFT_TOL,
    RESUME_TOL,
    TrainedRun,
    identity_error,
    merged_output,
    plain_peft_output,
    reloaded_output,
    resumed_losses,
    saved_tensors_output,
    train_run,
    training_arguments,
    with_saved_tensors,
    within,
)
from .models import (  # noqa: E402
    BERT_CLS,
    GEMMA,
    GPT2,
    LLAMA,
    MISTRAL,
    MODEL_CASES,
    MORE_MODEL_CASES,
    PHI3,
    QWEN2,
    ROBERTA_CLS,
    T5,
    ModelCase,
    TokenDataset,
    kit_devices,
    output,
    rel_err,
)

__all__ = [
    "BERT_CLS",
    "GEMMA",
    "MISTRAL",
    "MORE_MODEL_CASES",
    "PHI3",
    "QWEN2",
    "ROBERTA_CLS",
    "CHECKS",
    "GPT2",
    "IDENTITY_TOL",
    "LLAMA",
    "MERGE_TOL",
    "MODEL_CASES",
    "MethodConformance",
    "ModelCase",
    "PLAIN_PEFT_TOL",
    "RESUME_TOL",
    "T5",
    "TokenDataset",
    "TrainedRun",
    "identity_error",
    "kit_devices",
    "merged_output",
    "output",
    "plain_peft_output",
    "rel_err",
    "reloaded_output",
    "resumed_losses",
    "saved_tensors_output",
    "train_run",
    "training_arguments",
    "with_saved_tensors",
    "within",
]
