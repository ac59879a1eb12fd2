"""LoRA-GA against the method contract (hf_lowrank_plugins.testing) over the model matrix."""

from hf_lowrank_plugins.testing import MethodConformance


class TestLoraGaConformance(MethodConformance):
    method = "lora_ga"
    settings = {"r": 2, "ga_batches": 2}
    bad_settings = [
        ({"direction": "sideways"}, "direction must be one of"),
        ({"ga_batches": 0}, "ga_batches must be"),
        ({"r": 4, "sketch_rank": 4}, "sketch_rank 4 is below 2r"),
    ]
