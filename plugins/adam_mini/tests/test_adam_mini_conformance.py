"""Adam-mini against the method contract (hf_lowrank_plugins.testing) over the model matrix."""

from hf_lowrank_plugins.testing import MethodConformance


class TestAdamMiniConformance(MethodConformance):
    method = "adam_mini"
    bad_settings = [({"num_attention_heads": 0}, "num_attention_heads must be >= 1")]
