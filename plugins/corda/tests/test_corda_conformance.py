"""CorDA against the method contract (hf_lowrank_plugins.testing) over the model matrix."""

from hf_lowrank_plugins.testing import MethodConformance
from hf_lowrank_plugins.testing.models import GPT2, LLAMA


class TestCordaConformance(MethodConformance):
    method = "corda"
    settings = {"r": 4, "calibration_batches": 2}
    # causal language models only: PEFT's covariance hook reads each target's input as one sequence's token rows,
    # which a classifier's pooler and an encoder-decoder's decoder layers are not (refused, tests/test_corda.py)
    models = (LLAMA, GPT2)
    bad_settings = [
        ({"corda_method": "both"}, "corda_method must be one of"),
        ({"use_dora": True}, "cannot be combined with use_dora"),
        ({"init_lora_weights": "pissa"}, "cannot use init_lora_weights='pissa'"),
    ]


class TestCordaKnowledgePreservingConformance(MethodConformance):
    method = "corda"
    settings = {"r": 4, "calibration_batches": 2, "corda_method": "kpm"}
    models = (LLAMA,)
