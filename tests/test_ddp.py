"""Two CPU processes (gloo) through the Trainer: ranks stay identical and the run trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_lowrank_plugins.testing.helpers import TORCHRUN_TWO_PROCESSES

pytestmark = pytest.mark.integration  # end to end: left out of `make test-fast`


HERE = Path(__file__).resolve().parent


@pytest.mark.ddp
@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "galore"])
def test_two_process_ddp_through_the_trainer(tmp_path, method):
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            *TORCHRUN_TWO_PROCESSES,
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


def _torchrun_train(
    out: Path, model: Path, data: Path, *extra: str, launcher: str = "torchrun"
) -> subprocess.CompletedProcess:
    """``hf-lowrank train`` on two CPU processes, as `torchrun --nproc_per_node 2 $(which hf-lowrank) train` runs it
    (``launcher="deepspeed"``: `deepspeed --num_gpus 2 $(which hf-lowrank) train`; ``"none"``: one process, with
    the same global batch of 4)."""
    processes = 1 if launcher == "none" else 2
    argv = ["--method", "lora", "--model", str(model), "--dataset", str(data), "--output-dir", str(out)]
    argv += ["--max-steps", "6", "--batch-size", str(4 // processes), "--seq-len", "16", "--eval-blocks", "2"]
    argv += ["--rank", "2", "--lr", "5e-3", "--save-steps", "3", *extra]
    hf_lowrank = [str(Path(sys.executable).parent / "hf-lowrank")]
    command = {
        "torchrun": [*TORCHRUN_TWO_PROCESSES, *hf_lowrank],
        "deepspeed": [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", *hf_lowrank],
        "none": hf_lowrank,
    }[launcher]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the deepspeed launcher's python
    return subprocess.run([*command, "train", *argv], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.ddp
def test_the_cli_under_torchrun_rank_0_owns_the_set_and_a_resume_equals_the_whole_run(
    tmp_path, tiny_model_dir, text_file
):
    """Every rank trains and checkpoints into one work folder (each its RNG state); only rank 0 claims,
    exports and reports, once. Resumed from the checkpoint of step 3, the run ends where the whole run does."""
    from safetensors.torch import load_file

    from hf_lowrank_plugins import verify_manifest

    whole = _torchrun_train(tmp_path / "whole", tiny_model_dir, text_file)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert sum(line.startswith("lora: eval loss") for line in whole.stdout.splitlines()) == 1
    checkpoint = tmp_path / "whole" / "checkpoints" / "checkpoint-3"
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    verify_manifest(tmp_path / "whole")
    assert not list((tmp_path / "whole").glob(".hf-lowrank-*"))  # no marker: the next run is not sent to resume

    resumed = _torchrun_train(
        tmp_path / "resumed", tiny_model_dir, text_file, "--resume-from-checkpoint", str(checkpoint)
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("whole", "resumed"))
    assert a["world_size"] == b["world_size"] == 2 and b["resumed_from_step"] == 3
    assert b["eval_loss_after"] == pytest.approx(a["eval_loss_after"], abs=1e-5)
    # (the Trainer's logged training losses after a two-process resume differ from the whole run's by ~1e-2
    # while the weights are bit-identical: a logging matter of the Trainer, so they are not compared here)
    assert a["train_examples"] == 6 * 2 * 2  # reading stops at what both processes use in 6 steps
    weights = [load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("whole", "resumed")]
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][k] - weights[1][k]).abs().max() <= 1e-6 for k in weights[0])  # bit-identical here

    before = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "whole").rglob("*"))
    refused = _torchrun_train(tmp_path / "whole", tiny_model_dir, text_file)
    assert refused.returncode != 0
    errors = [line for line in refused.stderr.splitlines() if line.startswith("hf-lowrank: error:")]
    assert len(errors) == 1 and "holds an earlier train output" in errors[0], errors
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "whole").rglob("*")) == before


def test_accelerate_launch_on_cpu_starting_one_of_several_processes_is_refused(tmp_path, tiny_model_dir, text_file):
    """`accelerate launch --cpu --num_processes 2` starts one process (accelerate runs CPU processes only
    through mpirun): the run used to train alone and say nothing; now it is one line naming torchrun."""
    argv = ["--method", "lora", "--model", str(tiny_model_dir), "--dataset", str(text_file)]
    argv += ["--output-dir", str(tmp_path / "out"), "--max-steps", "2"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [*launcher, "-m", "hf_lowrank_plugins", "train", *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    # ours, once (accelerate then repeats the child's stderr in its own RuntimeError)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hf-lowrank: error:")]
    assert len(lines) == 1 and "accelerate launch --cpu started one process" in lines[0], proc.stderr[-2000:]
    assert "torchrun --nproc_per_node N" in lines[0]
    assert not (tmp_path / "out").exists()  # refused before anything was claimed


ZERO_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
}


@pytest.mark.ddp
@pytest.mark.deepspeed
def test_the_cli_under_ddp_and_deepspeed_zero3_equals_one_process(tmp_path, tiny_model_dir, text_file):
    """Two processes with the same global batch train what one process trains: plain DDP (torchrun) and
    `--deepspeed ds.json` at ZeRO-3 under DeepSpeed's own launcher (every weight partitioned; the adapter and
    merged model gathered for rank 0 to write). The DDP run used to train each rank alone: the Trainer's evaluation before training marked the
    model prepared without wrapping it, so gradients were never averaged (the ranks' weights parted at step 1)."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    from hf_lowrank_plugins import verify_manifest

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}, **ZERO_CONFIG}))
    runs = {"single": ((), "none"), "ddp": ((), "torchrun"), "zero3": (("--deepspeed", str(config)), "deepspeed")}
    for name, (extra, launcher) in runs.items():
        done = _torchrun_train(tmp_path / name, tiny_model_dir, text_file, "--merge", *extra, launcher=launcher)
        assert done.returncode == 0, done.stderr[-3000:]
        assert sum(line.startswith("lora: eval loss") for line in done.stdout.splitlines()) == 1
        verify_manifest(tmp_path / name)
    metrics = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in runs}
    assert [metrics[name]["world_size"] for name in runs] == [1, 2, 2]
    single = metrics["single"]
    for name in ("ddp", "zero3"):
        assert metrics[name]["steps"] == 6 and metrics[name]["train_examples"] == single["train_examples"]
        assert metrics[name]["eval_loss_before"] == pytest.approx(single["eval_loss_before"], rel=1e-6)
        assert metrics[name]["eval_loss_after"] == pytest.approx(single["eval_loss_after"], rel=1e-5)
        for deliverable in ("adapter/adapter_model.safetensors", "merged/model.safetensors"):
            a, b = load_file(tmp_path / "single" / deliverable), load_file(tmp_path / name / deliverable)
            assert a.keys() == b.keys()
            for key in a:  # reduction order and DeepSpeed's fp32 master weights: equal to float rounding
                scale = a[key].abs().max().clamp_min(1e-12)
                assert ((a[key] - b[key]).abs().max() / scale).item() <= 1e-4, (name, key)
