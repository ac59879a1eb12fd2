"""LoftQ against the method contract (hf_lowrank_plugins.testing) over the model matrix."""

from hf_lowrank_plugins.testing import MethodConformance


class TestLoftqConformance(MethodConformance):
    method = "loftq"
    settings = {"r": 4}
    bad_settings = [
        ({"use_dora": True}, "cannot be combined with use_dora"),
        ({"init_lora_weights": "pissa"}, "cannot use init_lora_weights='pissa'"),
    ]
