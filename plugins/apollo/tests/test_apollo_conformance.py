"""APOLLO and APOLLO-Mini against the method contract (hf_lowrank_plugins.testing) over the model matrix."""

from hf_lowrank_plugins.testing import MethodConformance


class TestApolloConformance(MethodConformance):
    method = "apollo"
    settings = {"rank": 4, "update_proj_gap": 2}  # a projection refresh falls inside the resumed half
    bad_settings = [({"scale_type": "row"}, "scale_type must be one of"), ({"scale": 0}, "scale must be > 0")]


class TestApolloMiniConformance(MethodConformance):
    method = "apollo_mini"
    settings = {"update_proj_gap": 2}
    # the defaults (scale 128: updates sqrt(128) times the rate's) at a tenth of the kit's rate, which they
    # overshoot on the BERT classifier's 4 steps
    learning_rate = 5e-4
    bad_settings = [({"proj": "qr"}, "proj must be one of")]
