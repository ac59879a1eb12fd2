"""OLoRA against the method contract (hf_lowrank_plugins.testing) over the model matrix."""

from hf_lowrank_plugins.testing import MethodConformance
from hf_lowrank_plugins.testing.models import BERT_CLS, LLAMA, T5


class TestOloraConformance(MethodConformance):
    method = "olora"
    settings = {"r": 4}
    # GPT-2's Conv1D stores (in x out) weights, which PEFT's QR initialisation cannot take: refused at attach
    # (tests/test_olora.py), so the matrix is the other three architectures
    models = (LLAMA, T5, BERT_CLS)
    bad_settings = [
        ({"use_dora": True}, "cannot be combined with use_dora"),
        ({"init_lora_weights": "pissa"}, "cannot use init_lora_weights='pissa'"),
    ]
