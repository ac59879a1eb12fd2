"""A third-party method package, installed with pip, is discovered through its entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # end to end: left out of `make test-fast`

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, torch
from transformers import Trainer
import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.testing.helpers import TokenDataset, make_tiny_model, training_args

info = hlp.get_registry().methods["loraplus"]
adapted = hlp.attach(make_tiny_model(), "loraplus", r=4, loraplus_lr_ratio=16.0)
trainer = Trainer(model=adapted.model, args=training_args(__import__("sys").argv[1], max_steps=3),
                  train_dataset=TokenDataset(), **adapted.trainer_kwargs())
trainer.train()
opt = trainer.optimizer.optimizer
lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
named = dict(adapted.model.named_parameters())
a = [lr_of[id(p)] for n, p in named.items() if "lora_A" in n]
b = [lr_of[id(p)] for n, p in named.items() if "lora_B" in n]
print(json.dumps({"distribution": info.distribution, "version": info.version, "lr_a": a[0], "lr_b": b[0],
                  "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e]}))
"""


@pytest.fixture(scope="module")
def installed_loraplus(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT / "examples" / "loraplus"),
        ],
        check=True,
        capture_output=True,
    )
    return target


def test_example_plugin_is_discovered_listed_and_trains(installed_loraplus, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed_loraplus), str(ROOT / "tests")])}
    listed = subprocess.run(
        [sys.executable, "-m", "hf_lowrank_plugins.app.cli", "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    names = {m["name"] for m in json.loads(listed.stdout)["methods"]}
    assert {"lora", "qlora", "loraplus"} <= names

    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path)], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["distribution"] == "hf-lowrank-loraplus" and result["version"] == "0.1.0"
    assert result["lr_b"] == pytest.approx(16 * result["lr_a"])  # same schedule point, 16x for B
    assert result["losses"][-1] < result["losses"][0]


def test_not_installed_without_the_package():
    listed = subprocess.run(
        [sys.executable, "-m", "hf_lowrank_plugins.app.cli", "list", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "loraplus" not in {m["name"] for m in json.loads(listed.stdout)["methods"]}
