"""The third-party example plugin runs the same contract as the built-in methods, with these few lines.

Installed (``pip install -e examples/loraplus``) it is found through its entry point; in this
repository's test run it is not installed, so the module registers it by hand first.
"""

import sys
from pathlib import Path

from hf_lowrank_plugins import get_registry
from hf_lowrank_plugins.testing import MethodConformance

if "loraplus" not in get_registry().methods:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import hf_lowrank_loraplus

    get_registry().register(hf_lowrank_loraplus, name="loraplus", distribution=("hf-lowrank-loraplus", "0.1.0"))


class TestLoraPlusConformance(MethodConformance):
    method = "loraplus"
    settings = {"r": 4, "loraplus_lr_ratio": 4.0}
    bad_settings = [({"loraplus_lr_ratio": 0}, "loraplus_lr_ratio must be > 0")]
