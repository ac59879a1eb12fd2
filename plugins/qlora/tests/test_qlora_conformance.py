"""QLoRA against the method contract (hf_lowrank_plugins.testing) over the model matrix."""

import pytest

from hf_lowrank_plugins.testing import MethodConformance

pytest.importorskip("bitsandbytes")


class TestQloraConformance(MethodConformance):
    method = "qlora"
    settings = {"r": 4, "lora_alpha": 8}
    bad_settings = [({"bnb_4bit_quant_type": "int3"}, "bnb_4bit_quant_type must be one of")]
