"""LoRA against the method contract (hf_lowrank_plugins.testing) over the model matrix."""

from hf_lowrank_plugins.testing import MethodConformance


class TestLoraConformance(MethodConformance):
    method = "lora"
    settings = {"r": 4, "lora_alpha": 8}
    bad_settings = [
        ({"r": 0}, "r must be >= 1"),
        ({"lora_dropout": 1.5}, "lora_dropout must be < 1"),
        ({"r": 4.5}, "r must be int"),
    ]
