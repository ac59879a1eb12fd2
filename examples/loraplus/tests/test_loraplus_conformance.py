"""The third-party example plugin runs the same contract as the built-in methods, with these few lines.

Installed (``pip install -e examples/loraplus``) it is found through its entry point; in this
repository's test run it may not be installed: the kit then registers the module by hand.
"""

import sys
from pathlib import Path

from hf_lowrank_plugins.testing import MethodConformance

try:
    import hf_lowrank_loraplus
except ImportError:  # not installed: import it from its source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import hf_lowrank_loraplus


class TestLoraPlusConformance(MethodConformance):
    method = "loraplus"
    plugin = hf_lowrank_loraplus
    settings = {"r": 4, "loraplus_lr_ratio": 4.0}
    bad_settings = [({"loraplus_lr_ratio": 0}, "loraplus_lr_ratio must be > 0")]
