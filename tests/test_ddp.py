"""Two CPU processes (gloo) through the Trainer: ranks stay identical and the run trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.ddp
@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "galore"])
def test_two_process_ddp_through_the_trainer(tmp_path, method):
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(HERE / "ddp_train.py"),
            method,
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["world_size"] == 2
    assert result["max_rank_difference"] == 0.0  # DDP averaged gradients: identical trained weights
    assert result["losses"][-1] < result["losses"][0]
    deliverable = "adapter/adapter_model.safetensors" if method != "galore" else "merged/model.safetensors"
    assert (tmp_path / "export" / deliverable).is_file()
