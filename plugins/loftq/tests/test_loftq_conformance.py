"""LoftQ against the method contract (hf_lowrank_plugins.testing) over the model matrix."""

import pytest

from hf_lowrank_plugins.testing import MethodConformance


class TestLoftqConformance(MethodConformance):
    method = "loftq"
    settings = {"r": 4}
    bad_settings = [
        ({"use_dora": True}, "cannot be combined with use_dora"),
        ({"init_lora_weights": "pissa"}, "cannot use init_lora_weights='pissa'"),
    ]


class TestLoftqAlternationsConformance(MethodConformance):
    """Two alternations: the base is NF4(W - s*B@A), exported in base/ and named by adapter/. Without double
    quantization (PEFT's LoftQ quantization) a loader's NF4 of base/ is the trained base bit for bit."""

    pytestmark = pytest.mark.integration  # a variant of the class above: the full suite, not the inner loop
    method = "loftq"
    settings = {"r": 4, "loftq_iter": 2, "bnb_4bit_use_double_quant": False}
