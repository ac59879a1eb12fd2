"""DoRA against the method contract (hf_lowrank_plugins.testing) over the model matrix."""

from hf_lowrank_plugins.testing import MethodConformance


class TestDoraConformance(MethodConformance):
    method = "dora"
    settings = {"r": 4, "lora_alpha": 8}
    bad_settings = [({"use_dora": False}, "needs use_dora=True"), ({"r": -1}, "r must be >= 1")]
