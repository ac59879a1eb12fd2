"""GaLore against the method contract (hf_lowrank_plugins.testing) over the model matrix."""

from hf_lowrank_plugins.testing import MethodConformance


class TestGaloreConformance(MethodConformance):
    method = "galore"
    settings = {"rank": 4, "update_proj_gap": 2}  # a projector refresh falls inside the resumed half
    bad_settings = [({"proj_type": "diagonal"}, "proj_type must be one of"), ({"scale": 0}, "scale must be > 0")]
