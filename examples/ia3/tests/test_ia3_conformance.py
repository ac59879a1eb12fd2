"""A PEFT tuner outside the LoRA family runs the same contract as the built-in methods.

Installed (``pip install -e examples/ia3``) it is found through its entry point; otherwise the kit
registers the module by hand.
"""

import sys
from pathlib import Path

from hf_lowrank_plugins.testing import MethodConformance

try:
    import hf_lowrank_ia3
except ImportError:  # not installed: import it from its source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import hf_lowrank_ia3


class TestIa3Conformance(MethodConformance):
    method = "ia3"
    plugin = hf_lowrank_ia3
    settings = {"target_modules": "all-linear"}
    # the scaling vectors start at 1 and move by about the rate per step: at the kit's 5e-3, 4 steps on GPT-2 do not
    # lower its loss (the paper trains them at 3e-3 for 1000 steps)
    learning_rate = 3e-2
    bad_settings = [({"fan_in_fan_out": "sometimes"}, "fan_in_fan_out")]


def test_plan_lays_the_ia3_vectors_and_counts_what_attach_trains():
    """`hf-lowrank plan` builds the adapter on the meta device through PEFT's default initialisation,
    whatever the tuner calls it: the trainable parameters it counts are those attach trains."""
    import torch

    import hf_lowrank_plugins as hlp
    from hf_lowrank_plugins.plan import plan_memory
    from hf_lowrank_plugins.testing.helpers import tiny_llama_config
    from hf_lowrank_plugins.testing.models import LLAMA

    registry = hlp.get_registry()
    if "ia3" not in registry.methods:
        registry.register(hf_lowrank_ia3, name="ia3-by-hand")
    plan = plan_memory(tiny_llama_config(), "ia3", hlp.PlanSettings(dtype=torch.float32))
    adapted = hlp.attach(LLAMA.build(), "ia3")
    trainable = sum(p.numel() for p in adapted.model.parameters() if p.requires_grad)
    assert plan.trainable_params == trainable > 0
    assert plan.terms["optimizer"] == 8 * trainable  # AdamW's two fp32 moments


def test_the_card_of_an_ia3_adapter_points_to_the_merged_model_not_to_lora_serving(tmp_path):
    """Serving notes are the LoRA family's knowledge (its config's ``serving_card_lines``): an IA3 adapter,
    which LoRA-serving engines do not load, gets no `--max-lora-rank` advice but the merged model."""
    import hf_lowrank_plugins as hlp
    from hf_lowrank_plugins.testing.models import LLAMA

    registry = hlp.get_registry()
    if "ia3" not in registry.methods:
        registry.register(hf_lowrank_ia3, name="ia3-by-hand")
    card = (hlp.attach(LLAMA.build(), "ia3").export(tmp_path / "out").adapter_dir / "README.md").read_text()
    assert "--max-lora-rank" not in card and "--enable-lora" not in card
    assert "Serving engines load LoRA adapters only: serve this adapter merged (`hf-lowrank merge adapter" in card
