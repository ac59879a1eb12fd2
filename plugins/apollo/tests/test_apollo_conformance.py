"""APOLLO and APOLLO-Mini against the method contract (hf_lowrank_plugins.testing) over the model matrix."""

from hf_lowrank_plugins.testing import MethodConformance


class TestApolloConformance(MethodConformance):
    method = "apollo"
    settings = {"rank": 4, "update_proj_gap": 2}  # a projection refresh falls inside the resumed half
    bad_settings = [({"scale_type": "row"}, "scale_type must be one of"), ({"scale": 0}, "scale must be > 0")]


class TestApolloMiniConformance(MethodConformance):
    method = "apollo_mini"
    # the kit trains at one lr for all; sqrt(128) times it overshoots on the BERT classifier's 4 steps, so the
    # mechanics (rank 1, one factor per weight) run at scale 1 here; test_apollo.py runs the defaults
    settings = {"update_proj_gap": 2, "scale": 1.0}
    bad_settings = [({"proj": "qr"}, "proj must be one of")]
