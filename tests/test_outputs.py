"""Output folders: nothing that is not ours is ever replaced, and a set is complete only with its manifest."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.app.cli import main
from hf_lowrank_plugins.outputs import (
    MANIFEST_NAME,
    MARKER_NAME,
    OutputFolderError,
    OutputSet,
    read_manifest,
    verify_manifest,
)
from hf_lowrank_plugins.testing.helpers import make_tiny_model

pytestmark = pytest.mark.integration  # end to end: left out of `make test-fast`


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with its content hash: equal trees are byte-identical."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _train_argv(model_dir, data, out, *extra):
    return [
        "train",
        "--method",
        "lora",
        "--model",
        str(model_dir),
        "--dataset",
        str(data),
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--eval-blocks",
        "2",
        "--rank",
        "2",
        *extra,
    ]


def _refused(capsys, argv, pattern, root):
    capsys.readouterr()  # drop what earlier steps printed
    before = tree(root)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and pattern in err[0], err
    assert tree(root) == before


@pytest.fixture
def saved_adapter(tmp_path):
    base = tmp_path / "base"
    model = make_tiny_model()
    model.save_pretrained(base)
    adapted = hlp.attach(make_tiny_model(), "lora", r=2)
    adapted.model.peft_config["default"].base_model_name_or_path = str(base)
    result = adapted.export(tmp_path / "export")
    return base, result.adapter_dir


def test_merge_never_destroys_its_inputs_or_a_foreign_folder(capsys, tmp_path, saved_adapter):
    base, adapter = saved_adapter
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my notes")
    for argv, pattern in [
        (["merge", str(adapter), "--output-dir", str(adapter)], "is the adapter"),
        (["merge", str(adapter), "--output-dir", str(adapter / "sub")], "lies inside the adapter"),
        (["merge", str(adapter), "--base", str(base), "--output-dir", str(base)], "is the base model"),
        (["merge", str(adapter), "--output-dir", str(tmp_path / "export"), "--overwrite"], "holds the adapter"),
        (["merge", str(adapter), "--output-dir", str(foreign)], "was not written by hf-lowrank"),
        (["merge", str(adapter), "--output-dir", str(foreign), "--overwrite"], "not even with --overwrite"),
    ]:
        _refused(capsys, argv, pattern, tmp_path)


def test_merge_writes_a_complete_set_and_replaces_only_with_overwrite(capsys, tmp_path, saved_adapter):
    _, adapter = saved_adapter
    out = tmp_path / "merged"
    assert main(["merge", str(adapter), "--output-dir", str(out)]) == 0
    assert verify_manifest(out) == [] and (out / "config.json").is_file()
    assert read_manifest(out)["command"] == "merge" and not (out / MARKER_NAME).exists()
    _refused(capsys, ["merge", str(adapter), "--output-dir", str(out)], "pass --overwrite to replace it", tmp_path)
    (out / "model.safetensors").write_bytes(b"corrupted")
    assert any("model.safetensors" in p for p in verify_manifest(out))
    assert main(["merge", str(adapter), "--output-dir", str(out), "--overwrite"]) == 0
    assert verify_manifest(out) == []


def test_rerun_replaces_the_whole_set(capsys, tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "run"
    assert main(_train_argv(tiny_model_dir, text_file, out, "--merge")) == 0
    first = read_manifest(out)
    assert {"adapter", "merged", "metrics.json", "trainer_state.json"} == set(first["entries"])
    assert not (out / "checkpoints").exists()  # nothing saved: no empty folder
    _refused(capsys, _train_argv(tiny_model_dir, text_file, out), "holds an earlier train output", tmp_path)
    assert main(_train_argv(tiny_model_dir, text_file, out, "--overwrite", "--seed", "1")) == 0
    second = read_manifest(out)
    assert set(second["entries"]) == {"adapter", "metrics.json", "trainer_state.json"} and not (out / "merged").exists()
    assert verify_manifest(out) == [] and second["files"] != first["files"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["adapter", "metrics.json", "trainer_state.json", MANIFEST_NAME]
    )


def test_output_inside_an_input_is_refused(capsys, tmp_path, tiny_model_dir, text_file):
    before = tree(tiny_model_dir)
    assert main(_train_argv(tiny_model_dir, text_file, tiny_model_dir / "run")) == 2
    assert "lies inside the base model" in capsys.readouterr().err and tree(tiny_model_dir) == before
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "d.txt").write_text(text_file.read_text())
    _refused(capsys, _train_argv(tiny_model_dir, data_dir / "d.txt", data_dir), "holds the dataset", tmp_path)


def test_output_set_life_cycle(tmp_path):
    """States, leftovers of a killed writer, abort, and the previous set's entries removed at commit."""
    out = tmp_path / "o"
    with OutputSet(out, command="test") as outputs:
        (outputs.stage / "a.txt").write_text("1")
        (outputs.stage / "b").mkdir()
        (outputs.stage / "b" / "c.txt").write_text("2")
        outputs.commit()
    assert verify_manifest(out) == [] and OutputSet(out, command="test", overwrite=True).check() == "complete"
    with pytest.raises(OutputFolderError, match="holds an earlier test output"):
        OutputSet(out, command="test").check()

    # an overwriting writer killed after claiming: marker and staging leftovers, the earlier set whole
    outputs = OutputSet(out, command="test", overwrite=True).open()
    (outputs.stage / "a.txt").write_text("half")
    assert verify_manifest(out) == [] and (out / "a.txt").read_text() == "1"  # the old set stays until commit
    marker = json.loads((out / MARKER_NAME).read_text())
    marker["pid"] = 2**22 + 12345  # no such process: it was killed
    (out / MARKER_NAME).write_text(json.dumps(marker))
    with pytest.raises(OutputFolderError, match="holds an earlier test output .*did not complete; this set is intact"):
        OutputSet(out, command="test").check()
    again = OutputSet(out, command="test", overwrite=True).open()
    assert again.cleaned and all(name.startswith(".hf-lowrank-staging-") for name in again.cleaned)
    (again.stage / "a.txt").write_text("new")
    again.commit()
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", MANIFEST_NAME]  # b/ belonged to the old set
    assert (out / "a.txt").read_text() == "new"

    # bad input after claiming a new folder: nothing is left behind
    fresh = tmp_path / "x" / "y"
    with pytest.raises(RuntimeError), OutputSet(fresh, command="test"):
        raise RuntimeError("bad input found late")
    assert not (tmp_path / "x").exists()


def _killed(out):
    """Make the marker's writer a process that no longer exists, as after a kill."""
    marker = json.loads((out / MARKER_NAME).read_text())
    marker["pid"] = 2**22 + 12345
    (out / MARKER_NAME).write_text(json.dumps(marker))


def test_a_users_file_beside_a_set_survives_a_failed_overwrite_and_the_next_one(tmp_path):
    """The retry after a failed --overwrite took everything in the folder for the failed run's, notes too."""
    out = tmp_path / "o"
    with OutputSet(out, command="test") as outputs:
        (outputs.stage / "adapter").mkdir()
        outputs.commit()
    (out / "notes.txt").write_text("mine")
    before = tree(out)
    with pytest.raises(RuntimeError), OutputSet(out, command="test", overwrite=True):
        raise RuntimeError("the export failed")
    assert tree(out) == before  # a failed overwrite leaves the folder as it found it
    OutputSet(out, command="test", overwrite=True).open()  # and killed: its marker and stage are left
    _killed(out)
    with OutputSet(out, command="test", overwrite=True) as outputs:
        (outputs.stage / "merged").mkdir()
        outputs.commit()
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "merged", "notes.txt"]


def test_an_overwrite_starts_the_logs_it_writes_in_place_empty(tmp_path):
    """A rerun's tensorboard/ (or compare's logs/) kept the old run's event files and listed them as its own."""
    out = tmp_path / "o"
    with OutputSet(out, command="test", in_place=["logs"]) as outputs:
        (out / "logs").mkdir()
        (out / "logs" / "old-run.log").write_text("old")
        outputs.commit()
    with OutputSet(out, command="test", overwrite=True, in_place=["logs"]) as outputs:
        assert not (outputs.work / "logs").exists() and (out / "logs" / "old-run.log").exists()
        (outputs.work / "logs").mkdir()
        (outputs.work / "logs" / "new-run.log").write_text("new")
        outputs.commit()
    assert set(read_manifest(out)["files"]) == {"logs/new-run.log"}
    with OutputSet(out, command="test", overwrite=True) as outputs:  # a run that writes no logs
        (outputs.stage / "adapter").mkdir()
        outputs.commit()
    assert sorted(p.name for p in out.iterdir()) == ["adapter", MANIFEST_NAME]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_deliverables_get_the_modes_the_umask_gives(tmp_path, umask):
    """Temporary names (mkdtemp, mkstemp, safetensors' writer) are private; a model only its owner can read
    is useless to a serving account."""
    adapted = hlp.attach(make_tiny_model(), "lora", r=2)
    previous = os.umask(umask)
    try:
        adapted.export(tmp_path / "out", merge=True)
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*")}
    assert "adapter/adapter_model.safetensors" in modes and "merged/model.safetensors" in modes
    for name, mode in modes.items():
        expected = 0o777 if (out / name).is_dir() else 0o666
        assert mode == expected & ~umask, (name, oct(mode))


@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_an_exported_adapter_carries_the_tokenizer_it_was_given(tmp_path, tiny_model_dir, method):
    """With merge=False the tokenizer went nowhere: only merged/ got it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    adapted = hlp.attach(AutoModelForCausalLM.from_pretrained(tiny_model_dir), method, r=2)
    result = adapted.export(tmp_path / "out", tokenizer=tokenizer)
    assert result.merged_dir is None and verify_manifest(tmp_path / "out") == []
    assert AutoTokenizer.from_pretrained(result.adapter_dir).get_vocab() == tokenizer.get_vocab()


def test_a_running_writer_is_not_disturbed(tmp_path):
    out = tmp_path / "o"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        outputs = OutputSet(out, command="test").open()
        marker = json.loads((out / MARKER_NAME).read_text())
        marker["pid"] = sleeper.pid
        (out / MARKER_NAME).write_text(json.dumps(marker))
        with pytest.raises(OutputFolderError, match=f"pid {sleeper.pid}.* is writing to"):
            OutputSet(out, command="test", overwrite=True).check()
        outputs.abort()
    finally:
        sleeper.kill()


def test_atomic_directory_refuses_to_replace_a_non_empty_folder(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(FileExistsError), hlp.atomic_directory(target):
        pass
    assert (target / "keep").read_text() == "x"


def test_export_refuses_a_foreign_folder(tmp_path):
    adapted = hlp.attach(make_tiny_model(), "lora", r=2)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputFolderError, match="not written by hf-lowrank"):
        adapted.export(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


# ------------------------------------------------------------------ kill -9 during training and export

SLOW_EXPORT_DRIVER = """
import sys, time
import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.app.cli import main


class SlowExport:  # an observer: waits after the method wrote its deliverables into the stage
    @hlp.hookimpl(wrapper=True)
    def post_train_merge(self, model, config, output_dir, merge, tokenizer):
        result = yield
        print("EXPORT-WRITTEN", flush=True)
        time.sleep(120)
        return result

hlp.get_registry().register(SlowExport(), name="slow-export")
sys.exit(main(sys.argv[1:]))
"""


def _start(argv, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_EXPORT_DRIVER, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


@pytest.mark.parametrize("moment", ["training", "export"])
def test_kill_9_never_leaves_a_set_that_looks_complete(tmp_path, tiny_model_dir, text_file, capsys, moment):
    out = tmp_path / "run"
    argv = _train_argv(tiny_model_dir, text_file, out, "--merge", "--save-steps", "1")
    if moment == "training":
        argv[argv.index("--max-steps") + 1] = "400"
    proc = _start(argv, tmp_path)
    try:
        if moment == "export":
            assert proc.stdout is not None
            assert any(line.strip() == "EXPORT-WRITTEN" for line in proc.stdout)  # the Trainer's logs come first
            assert any(p.name.startswith(".hf-lowrank-staging-") for p in out.iterdir())
        else:
            deadline = time.time() + 120
            while not (out / "checkpoints" / "checkpoint-3").is_dir() and time.time() < deadline:
                time.sleep(0.2)
            assert (out / "checkpoints" / "checkpoint-3").is_dir()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert read_manifest(out) is None and verify_manifest(out)
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    # the next run names what it found, and resuming (or --overwrite) cleans the leftovers
    assert main(_train_argv(tiny_model_dir, text_file, out)) == 2
    assert "holds an unfinished train" in capsys.readouterr().err
    saved = [p for p in (out / "checkpoints").iterdir() if (p / "trainer_state.json").is_file()]  # the kill may cut one
    checkpoint = max(saved, key=lambda p: int(p.name.split("-")[1]))
    assert (
        main(
            _train_argv(
                tiny_model_dir,
                text_file,
                out,
                "--resume-from-checkpoint",
                str(checkpoint),
                "--max-steps",
                str(int(checkpoint.name.split("-")[1]) + 1),
            )
        )
        == 0
    )
    assert verify_manifest(out) == []
    assert not any(p.name.startswith(".") and p.name != MANIFEST_NAME for p in out.iterdir())


def test_sigterm_is_handled_like_ctrl_c_and_the_run_resumes(tmp_path, tiny_model_dir, text_file, capsys):
    """A scheduler's SIGTERM: one line, exit 143, no stage left behind, the set marked unfinished, and the
    run resumes from its last checkpoint to a complete, verified set."""
    out = tmp_path / "run"
    argv = _train_argv(tiny_model_dir, text_file, out, "--save-steps", "1")
    argv[argv.index("--max-steps") + 1] = "400"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hf_lowrank_plugins.app.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "checkpoints" / "checkpoint-3").is_dir() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        "hf-lowrank: terminated (SIGTERM); completed outputs are intact, partial ones were not written"
    )
    assert "Traceback" not in err
    assert read_manifest(out) is None and not any(p.name.startswith(".hf-lowrank-staging-") for p in out.iterdir())
    saved = [p for p in (out / "checkpoints").iterdir() if (p / "trainer_state.json").is_file()]
    checkpoint = max(saved, key=lambda p: int(p.name.split("-")[1]))
    step = int(checkpoint.name.split("-")[1])
    resume = ["--resume-from-checkpoint", str(checkpoint), "--max-steps", str(step + 1)]
    assert main(_train_argv(tiny_model_dir, text_file, out, *resume)) == 0
    assert verify_manifest(out) == []
    assert json.loads((out / "metrics.json").read_text())["steps"] == step + 1


# ------------------------------------------------------------------ an overwrite replaces nothing until complete


def _complete_run_with_checkpoints(tiny_model_dir, text_file, out):
    assert main(_train_argv(tiny_model_dir, text_file, out, "--merge", "--save-steps", "1")) == 0
    assert verify_manifest(out) == [] and (out / "checkpoints" / "checkpoint-2").is_dir()
    return tree(out)


def _without_our_leftovers(snapshot):
    """A tree less the marker and hidden work folders a killed writer leaves (the next run removes them)."""
    return {k: v for k, v in snapshot.items() if not (k.startswith(".hf-lowrank-staging-") or k == MARKER_NAME)}


@pytest.mark.parametrize("moment", ["training", "export"])
def test_a_killed_overwrite_leaves_the_earlier_run_whole(tmp_path, tiny_model_dir, text_file, capsys, moment):
    """A failed --overwrite deleted the complete run's checkpoints and manifest before the new run finished."""
    out = tmp_path / "run"
    before = _complete_run_with_checkpoints(tiny_model_dir, text_file, out)
    argv = _train_argv(tiny_model_dir, text_file, out, "--merge", "--save-steps", "1", "--overwrite", "--seed", "3")
    if moment == "training":
        argv[argv.index("--max-steps") + 1] = "400"
    proc = _start(argv, tmp_path)
    try:
        if moment == "export":
            assert proc.stdout is not None
            assert any(line.strip() == "EXPORT-WRITTEN" for line in proc.stdout)
        else:
            deadline = time.time() + 120
            while time.time() < deadline and not any(out.glob(".hf-lowrank-staging-*/checkpoints/checkpoint-3")):
                time.sleep(0.2)
            assert any(out.glob(".hf-lowrank-staging-*/checkpoints/checkpoint-3"))
        assert verify_manifest(out) == []  # readable throughout
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _without_our_leftovers(tree(out)) == before and verify_manifest(out) == []
    # the next run is told the set is intact, not sent to a checkpoint that does not exist
    assert main(_train_argv(tiny_model_dir, text_file, out)) == 2
    assert "did not complete; this set is intact); pass --overwrite" in capsys.readouterr().err
    assert main(_train_argv(tiny_model_dir, text_file, out, "--overwrite")) == 0
    assert verify_manifest(out) == [] and not any(p.name.startswith(".hf-lowrank-staging-") for p in out.iterdir())


def test_a_full_disk_during_an_overwrite_leaves_the_earlier_run_byte_identical(tmp_path, tiny_model_dir, text_file):
    """The disk filled during export: one line, the earlier set, checkpoints and manifest untouched."""
    out = tmp_path / "run"
    before = _complete_run_with_checkpoints(tiny_model_dir, text_file, out)
    largest = max(p.stat().st_size for p in out.rglob("*") if p.is_file())
    limit = f"import resource; resource.setrlimit(resource.RLIMIT_FSIZE, ({largest // 2}, {largest // 2}))"
    argv = _train_argv(tiny_model_dir, text_file, out, "--merge", "--overwrite", "--seed", "3")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            f"{limit}; import sys; from hf_lowrank_plugins.app.cli import main; sys.exit(main())",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    ours = [line for line in proc.stderr.splitlines() if line.startswith("hf-lowrank:")]
    assert proc.returncode == 1 and len(ours) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "no space left" in ours[0] and "free space" in ours[0]
    assert tree(out) == before


def test_a_swap_killed_at_any_rename_is_rolled_forward(tmp_path, monkeypatch):
    """The swap is renames journaled in the marker: a kill after any of them ends in the new set, whole."""
    import hf_lowrank_plugins.outputs as outputs_module

    def make_old(out):
        with OutputSet(out, command="test") as outputs:
            for name, text in (("adapter", "old-a"), ("merged", "old-m")):
                (outputs.stage / name).mkdir()
                (outputs.stage / name / "w.bin").write_text(text)
            outputs.commit()
        (out / "checkpoints" / "checkpoint-1").mkdir(parents=True)

    real_replace = os.replace
    renames = 0
    for kill_after in range(1, 20):
        out = tmp_path / f"o{kill_after}"
        make_old(out)
        calls = 0

        def dying_replace(src, dst, kill_after=kill_after):
            nonlocal calls
            calls += 1
            if calls > kill_after:
                raise KeyboardInterrupt("killed")  # stands for SIGKILL: nothing after this rename runs
            return real_replace(src, dst)

        outputs = OutputSet(out, command="test", overwrite=True).open()
        (outputs.work / "adapter").mkdir()
        (outputs.work / "adapter" / "w.bin").write_text("new-a")
        (outputs.work / "checkpoints" / "checkpoint-2").mkdir(parents=True)
        monkeypatch.setattr(outputs_module.os, "replace", dying_replace)
        try:
            outputs.commit()
            finished = True
        except KeyboardInterrupt:
            finished = False
        monkeypatch.setattr(outputs_module.os, "replace", real_replace)
        if finished:
            renames = calls
            break
        marker = json.loads((out / MARKER_NAME).read_text())
        if marker["status"] == "committing":  # killed inside the swap: the next claim finishes it
            _killed(out)
            with pytest.raises(OutputFolderError, match="holds an earlier test output"):
                OutputSet(out, command="test").check()
            assert (out / "adapter" / "w.bin").read_text() == "new-a"
        else:  # killed before the swap began: the earlier set is whole
            assert (out / "adapter" / "w.bin").read_text() == "old-a"
        assert verify_manifest(out) == []
    assert renames > 3  # the loop reached a commit that finished, having killed every rename before it
