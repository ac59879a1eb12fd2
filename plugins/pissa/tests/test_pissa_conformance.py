"""PiSSA against the method contract (hf_lowrank_plugins.testing) over the model matrix."""

from hf_lowrank_plugins.testing import MethodConformance


class TestPissaConformance(MethodConformance):
    method = "pissa"
    settings = {"r": 4, "svd": "fast", "svd_niter": 2}  # a resume re-attaches: the seeded SVD rebuilds W_res exactly
    bad_settings = [
        ({"svd": "approx"}, "svd must be one of"),
        ({"svd_niter": 0}, "svd_niter must be >= 1"),
        ({"use_dora": True}, "cannot be combined with use_dora"),
    ]
