"""The built-in full fine-tuning baseline against the method contract over the model matrix."""

from hf_lowrank_plugins.testing import MethodConformance


class TestFullConformance(MethodConformance):
    method = "full"
