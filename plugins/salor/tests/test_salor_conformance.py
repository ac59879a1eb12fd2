"""SALOR against the method contract (hf_lowrank_plugins.testing) over the model matrix."""

from hf_lowrank_plugins.testing import MethodConformance


class TestSalorConformance(MethodConformance):
    method = "salor"
    settings = {"r": 4, "svd": "fast", "svd_niter": 2}
    bad_settings = [
        ({"sparsity": 1.0}, "sparsity must be"),
        ({"sparsity_pattern": "2:4", "sparsity": 0.3}, "2:4"),
        ({"adapter_schedule": "cubic"}, "adapter_schedule_steps >= 1"),
    ]
