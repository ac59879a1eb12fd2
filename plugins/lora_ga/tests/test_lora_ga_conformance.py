"""LoRA-GA against the method contract (hf_lowrank_plugins.testing) over the model matrix."""

import pytest

from hf_lowrank_plugins.testing import MethodConformance
from hf_lowrank_plugins.testing.models import MODEL_CASES

#: What adapter/ cannot be on a 4-bit base: the model trained on NF4(deq(NF4(W)) - s*B0@A0) + s*B@A, while a
#: loader that quantizes W gets NF4(W); the rank-2r adapter bridges s*B0@A0 but not the residual's rounding
#: (measured in plugins/lora_ga/benchmarks/qlora_ga_init_error.py; merged/ is the trained model itself).
RESIDUAL_ROUNDING = (
    "QLoRA-GA: adapter/ on NF4(W) differs from the model trained on the re-quantized residual by that "
    "residual's rounding (merged/ is exact)"
)


class TestLoraGaConformance(MethodConformance):
    method = "lora_ga"
    settings = {"r": 2, "ga_batches": 2}
    bad_settings = [
        ({"direction": "sideways"}, "direction must be one of"),
        ({"ga_batches": 0}, "ga_batches must be"),
        ({"r": 4, "sketch_rank": 4}, "sketch_rank 4 is below 2r"),
    ]


class TestQloraGaConformance(MethodConformance):
    """QLoRA-GA: the same method on a 4-bit base (the estimate on the dequantized weights, the residual
    quantized again), with the whole contract; the adapter's three loads on NF4(W) are off by the
    residual's rounding, strictly expected to fail."""

    pytestmark = pytest.mark.integration  # a variant of the class above: the full suite, not the inner loop
    method = "lora_ga"
    settings = {"r": 2, "ga_batches": 2}
    load_in_4bit = True
    expected_failures = {
        (case.name, check): RESIDUAL_ROUNDING
        for case in MODEL_CASES
        for check in ("round_trip", "plain_peft", "saved_tensors")
    }
