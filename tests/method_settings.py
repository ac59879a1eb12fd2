"""Small settings of every shipped method for the tests' tiny models (64 wide): one table the matrices
(architectures, TRL, the CLI) share, so a new method is added to them by adding its row."""

from __future__ import annotations

from typing import Any

SMALL_SETTINGS: dict[str, dict[str, Any]] = {
    "lora": {"r": 4},
    "qlora": {"r": 4},
    "dora": {"r": 4},
    "pissa": {"r": 4, "svd": "fast", "svd_niter": 2},
    "lora_ga": {"r": 2, "ga_batches": 2},
    "salor": {"r": 4, "svd": "fast", "svd_niter": 2},
    "galore": {"rank": 4},
    "full": {},
    "olora": {"r": 4},
    "eva": {"r": 4},
    "corda": {"r": 4, "calibration_batches": 2},
    "loftq": {"r": 4},
    "apollo": {"rank": 4},
    "apollo_mini": {},
    "adam_mini": {},
}

#: Peak learning rates other than the kit's 5e-3: APOLLO-Mini's scale of 128 multiplies each update by
#: sqrt(128), so its kit trains at a tenth of the rate (plugins/apollo/tests/test_apollo_conformance.py).
LEARNING_RATES: dict[str, float] = {"apollo_mini": 5e-4}
