"""EVA against the method contract (hf_lowrank_plugins.testing) over the model matrix."""

from hf_lowrank_plugins.testing import MethodConformance
from hf_lowrank_plugins.testing.models import GPT2, LLAMA


class TestEvaConformance(MethodConformance):
    method = "eva"
    settings = {"r": 4}
    # An encoder-decoder is refused at attach: PEFT's EVA masks every layer's tokens by the encoder's. A classifier's
    # pooler sees one row per sequence, fewer than the kit's batch of 4 needs for r * rho = 8 components: refused
    # with the remedy (tests/test_eva.py)
    models = (LLAMA, GPT2)
    bad_settings = [
        ({"rho": 0.5}, "rho"),
        ({"tau": 1.5}, "tau"),
        ({"init_lora_weights": "pissa"}, "cannot use init_lora_weights='pissa'"),
        # built from the flat fields, so a value given for it would be dropped: refused, naming them
        ({"eva_config": {"rho": 1.0}}, r"eva_config of method 'eva' is computed from its other options .*rho, tau"),
    ]
