"""Every installed method on the model families beyond the conformance kit's matrix.

The kit (each plugin's ``test_<name>_conformance.py``) covers Llama, GPT-2, T5 and BERT in full;
this runs every shipped method (``tests/method_settings.py``) once more on Qwen2, Mistral, Phi-3 (fused qkv/gate_up), Gemma and a RoBERTa
classifier (a two-layer head) and checks the numbers a user depends on: identity at init where
declared, merged equals adapted, and the adapter reproduced by plain PEFT in a clean process.
"""

from __future__ import annotations

import pytest
from method_settings import LEARNING_RATES, SMALL_SETTINGS

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.testing import MORE_MODEL_CASES, contract, rel_err

pytestmark = pytest.mark.integration  # end to end: left out of `make test-fast`


SETTINGS = SMALL_SETTINGS  # every shipped method
#: Families a method refuses at attach, by design, with the line it must say.
REFUSED = {("corda", "roberta_cls"): "CorDA on a SEQ_CLS model is not supported"}


@pytest.mark.parametrize("case", MORE_MODEL_CASES, ids=str)
@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_method_on_family(method, case, tmp_path):
    info = hlp.get_registry().get(method)
    refusal = REFUSED.get((method, case.name))
    if refusal is not None:
        with pytest.raises(hlp.IncompatibleError, match=refusal):
            hlp.attach(case.build(), method, **SETTINGS[method])
        return
    if info.identity_at_init:
        assert contract.identity_error(case, method, SETTINGS[method]) <= contract.IDENTITY_TOL
    run = contract.train_run(case, method, SETTINGS[method], tmp_path, learning_rate=LEARNING_RATES.get(method, 5e-3))
    assert run.losses[-1] < run.losses[0], run.losses
    assert rel_err(contract.merged_output(run), run.trained_output) <= contract.MERGE_TOL
    if info.trains_adapter:
        plain, report = contract.plain_peft_output(run)
        assert rel_err(plain, run.trained_output) <= contract.PLAIN_PEFT_TOL and report["warnings"] == []
