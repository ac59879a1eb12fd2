"""Models named by Hub id: resolved through huggingface_hub's cache (offline here: a cache laid out as
``hf download`` leaves it), used by train, merge, generate and plan, and named by the adapter as its base."""

from __future__ import annotations

import base64
import json
import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hf_lowrank_plugins.app.cli import main
from hf_lowrank_plugins.sources import resolve_model

pytestmark = pytest.mark.integration  # end to end: left out of `make test-fast`

sys.path.insert(0, str(Path(__file__).parent))
from test_outputs import _train_argv  # noqa: E402

MAIN, V1 = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tmp_path, tiny_model_dir, monkeypatch):
    """A Hub cache holding ``org/tiny`` at ``main`` and at tag ``v1``, with the Hub unreachable."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    for ref, commit in (("main", MAIN), ("v1", V1)):
        shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def test_a_hub_id_resolves_to_its_cached_snapshot_at_the_revision(hub_cache, tmp_path):
    assert resolve_model("org/tiny").folder == hub_cache / "snapshots" / MAIN
    source = resolve_model("org/tiny", "v1")
    assert (source.folder, source.hub_id, source.revision) == (hub_cache / "snapshots" / V1, "org/tiny", "v1")
    assert resolve_model(tmp_path).hub_id is None  # an existing path is a folder, whatever it looks like


def test_train_merge_generate_and_plan_take_a_hub_id(hub_cache, tmp_path, text_file, capsys):
    run = tmp_path / "run"
    assert main(_train_argv("org/tiny", text_file, run, "--revision", "v1")) == 0
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    # the adapter names the Hub id and revision, not this machine's cache, so it loads anywhere
    assert (adapter_config["base_model_name_or_path"], adapter_config["revision"]) == ("org/tiny", "v1")
    assert json.loads((run / "metrics.json").read_text())["model"] == "org/tiny"
    assert main(["merge", str(run / "adapter"), "--output-dir", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert main(["generate", "org/tiny", "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    assert main(["plan", "--method", "lora", "--model", "org/tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable_params"] > 0


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["plan", "--method", "lora", "--model", "org/missing"], "not in the Hugging Face cache"),
        (["plan", "--method", "lora", "--model", "org/tiny", "--revision", "v9"], "not in the Hugging Face cache"),
        (["generate", "org/missing", "--prompt", "hi"], "no local folder org/missing"),
    ],
)
def test_a_hub_id_missing_from_the_cache_offline_is_one_line(hub_cache, capsys, argv, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_a_revision_of_a_local_folder_is_refused(tiny_model_dir, capsys):
    assert main(["plan", "--method", "lora", str(tiny_model_dir), "--revision", "main"]) == 2
    assert "is a local folder, not a Hub id; drop --revision" in capsys.readouterr().err


class LocalHub(ThreadingHTTPServer):
    """The Hub's upload API as huggingface_hub speaks it, on localhost: create a repository, ask how each
    file is to be uploaded (answered "regular": its bytes travel in the commit, base64, no LFS or Xet), commit.
    Records the repositories with their visibility and every commit with its message and files."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.repos: dict[str, str | None] = {}  # repo id -> visibility asked for (None: the Hub's default)
        self.commits: list[dict] = []
        self.unknown: list[str] = []
        self.cards: list[dict] = []  # the metadata of each model card validated
        self.refuse = False  # answer 403 to everything (a token without write access)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(BaseHTTPRequestHandler):
    server: LocalHub

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # the commit's NDJSON is streamed
            body = b""
            while (size := int(self.rfile.readline().strip(), 16)) > 0:
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return body
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body, hub, path = self._body(), self.server, self.path.split("?")[0]
        if hub.refuse:
            return self._answer(403, {"error": "You don't have the rights to create a model under this namespace"})
        if path == "/api/repos/create":
            asked = json.loads(body)
            repo_id = f"{asked['organization']}/{asked['name']}" if asked.get("organization") else asked["name"]
            # huggingface_hub 2 sends "visibility"; earlier releases sent "private"
            private = {True: "private", False: "public"}.get(asked.get("private"))
            hub.repos[repo_id] = asked.get("visibility", private)
            return self._answer(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":  # the Hub checks a README's metadata block before a commit with it
            import yaml

            content = json.loads(body)["content"]
            front = content.split("---")[1] if content.startswith("---") else ""
            hub.cards.append(yaml.safe_load(front))  # a card whose metadata does not parse fails the push
            return self._answer(200, {"errors": [], "warnings": []})
        parts = path.split("/")  # /api/models/NS/NAME/(preupload|commit)/REVISION
        if len(parts) == 7 and parts[:3] == ["", "api", "models"] and parts[5] == "preupload":
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            return self._answer(200, {"files": modes})
        if len(parts) == 7 and parts[:3] == ["", "api", "models"] and parts[5] == "commit":
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files = {
                line["value"]["path"]: base64.b64decode(line["value"]["content"])
                for line in lines
                if line["key"] == "file"
            }
            oid = f"{len(hub.commits) + 1:040x}"
            hub.commits.append({"repo": f"{parts[3]}/{parts[4]}", "message": header["summary"], "files": files})
            return self._answer(
                200, {"commitUrl": f"{hub.endpoint}/{parts[3]}/{parts[4]}/commit/{oid}", "commitOid": oid}
            )
        hub.unknown.append(f"POST {self.path}")
        return self._answer(404, {"error": "not found"})


@pytest.fixture
def local_hub(monkeypatch):
    """huggingface_hub pointed at a :class:`LocalHub` (its ``HF_ENDPOINT``), online, with a token."""
    import huggingface_hub.constants as constants

    hub = LocalHub()
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    yield hub
    hub.shutdown()
    hub.server_close()


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_to_hub_uploads_the_committed_run_through_the_hub_api(
    local_hub, tiny_model_dir, text_file, tmp_path, capsys
):
    """Against a local endpoint speaking the Hub's upload protocol: the adapter at the repository's root (where
    PeftModel.from_pretrained(base, repo) looks), metrics.json beside it, merged/ in its folder, each file
    byte for byte, one commit each, after the local set is complete."""
    from hf_lowrank_plugins.outputs import verify_manifest

    out = tmp_path / "run"
    argv = ["--merge", "--push-to-hub", "--hub-model-id", "me/tiny", "--hub-private", "--push-merged"]
    assert main(_train_argv(tiny_model_dir, text_file, out, *argv)) == 0
    assert f"pushed to {local_hub.endpoint}/me/tiny" in capsys.readouterr().out
    assert verify_manifest(out) == [] and local_hub.unknown == []
    assert local_hub.repos == {"me/tiny": "private"}
    assert [(c["repo"], c["message"]) for c in local_hub.commits] == [
        ("me/tiny", "hf-lowrank: adapter"),
        ("me/tiny", "hf-lowrank: run metrics"),
        ("me/tiny", "hf-lowrank: merged weights"),
    ]
    adapter, metrics, merged = (c["files"] for c in local_hub.commits)
    assert adapter == _tree(out / "adapter") and "adapter_model.safetensors" in adapter and "README.md" in adapter
    assert metrics == {"metrics.json": (out / "metrics.json").read_bytes()}
    assert merged == {f"merged/{name}": data for name, data in _tree(out / "merged").items()}
    card = local_hub.cards[0]  # as the Hub parsed it
    assert card["library_name"] == "peft" and card["pipeline_tag"] == "text-generation"
    assert card["base_model"] == str(tiny_model_dir) and f"base_model:adapter:{tiny_model_dir}" in card["tags"]

    local_hub.commits.clear()
    plain = tmp_path / "plain"  # without --hub-private the Hub decides; without --push-merged merged/ stays local
    assert (
        main(_train_argv(tiny_model_dir, text_file, plain, "--merge", "--push-to-hub", "--hub-model-id", "me/b")) == 0
    )
    assert local_hub.repos["me/b"] is None
    assert [c["message"] for c in local_hub.commits] == ["hf-lowrank: adapter", "hf-lowrank: run metrics"]


def test_a_failed_push_keeps_the_complete_run_and_names_the_upload_command(
    local_hub, tiny_model_dir, text_file, tmp_path, capsys
):
    from hf_lowrank_plugins.outputs import verify_manifest

    local_hub.refuse = True
    out = tmp_path / "run"
    assert main(_train_argv(tiny_model_dir, text_file, out, "--push-to-hub", "--hub-model-id", "me/tiny")) == 1
    err = capsys.readouterr().err  # the progress bars of the run come before the one line
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("hf-lowrank: error: the run is complete in")
    assert f"hf upload me/tiny {out / 'adapter'} ." in last and "403" in last
    assert verify_manifest(out) == []


@pytest.mark.parametrize(
    "extra, offline, expected",
    [
        (["--hub-model-id", "me/tiny"], False, "add --push-to-hub"),
        (["--push-to-hub"], True, "HF_HUB_OFFLINE=1"),
        (["--push-to-hub", "--hub-model-id", "me/a/b"], False, "is not a Hub repository id"),
    ],
)
def test_push_settings_are_checked_before_training(
    monkeypatch, tiny_model_dir, text_file, tmp_path, capsys, extra, offline, expected
):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    out = tmp_path / "run"
    assert main(_train_argv(tiny_model_dir, text_file, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists() or not any(out.iterdir())


VERSES = [{"prompt": f"Quote verse {i}.", "completion": f" In the beginning {i} was the word {i}."} for i in range(48)]


@pytest.fixture
def dataset_cache(tmp_path, monkeypatch):
    """``acme/verses`` (splits train and test) in a datasets cache laid out as a download leaves it, offline.

    Built by the datasets library itself: its JSON builder prepares the Arrow files under the id's name,
    where ``load_dataset("acme/verses")`` looks when the Hub cannot be reached.
    """
    from datasets import config
    from datasets.packaged_modules.json.json import Json

    source = tmp_path / "verses.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in VERSES) + "\n")
    cache = tmp_path / "datasets"
    monkeypatch.setattr(config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(config, "HF_HUB_OFFLINE", True)
    builder = Json(
        cache_dir=str(cache),
        data_files={"train": str(source), "test": str(source)},
        dataset_name="verses",
        config_id="default",
        hash="0123abcd",
    )
    builder.repo_id = "acme/verses"  # as a download names it (the builder checks files against hf:// paths)
    builder._cache_dir = builder._build_cache_dir()
    builder.download_and_prepare()
    return source


def test_a_hub_dataset_trains_as_the_same_records_from_a_file(dataset_cache, tiny_model_dir, tmp_path):
    """The Hub id and the file it was made from give the same examples: equal losses before and after."""
    common = ["--eval-blocks", "4", "--batch-size", "2", "--seq-len", "32", "--max-steps", "3"]
    hub = [*common, "--dataset-split", "train", "--eval-dataset", "acme/verses", "--eval-dataset-split", "test"]
    assert main(_train_argv(tiny_model_dir, "acme/verses", tmp_path / "hub", *hub)) == 0
    local = [*common, "--eval-dataset", str(dataset_cache)]
    assert main(_train_argv(tiny_model_dir, dataset_cache, tmp_path / "file", *local)) == 0
    from_hub, from_file = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("hub", "file"))
    assert from_hub["dataset"] == "acme/verses (Hub, split train)"
    assert from_hub["eval_dataset"] == "acme/verses (Hub, split test)"
    # reading stops at what 3 steps of 2 use, from the Hub as from a file
    assert (
        from_hub["data_kind"] == "prompt_completion" and from_hub["train_examples"] == from_file["train_examples"] == 6
    )
    for key in ("eval_loss_before", "eval_loss_after", "train_loss"):
        assert from_hub[key] == pytest.approx(from_file[key], rel=1e-6), key


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--dataset", "acme/missing"], "dataset acme/missing is not in the Hugging Face cache"),
        (["--dataset", "acme/verses", "--dataset-split", "validation"], "acme/verses (Hub, split validation): "),
        (["--dataset-split", "test"], "--dataset-config and --dataset-split select within --dataset"),
        (["--eval-dataset-split", "test"], "--eval-dataset-split selects within --eval-dataset"),
        (["--dataset", "no/such/thing"], "dataset not found: no/such/thing"),
    ],
    ids=["missing-offline", "unknown-split", "split-without-dataset", "eval-split-without-eval", "not-an-id"],
)
def test_a_hub_dataset_problem_is_one_line(dataset_cache, tiny_model_dir, tmp_path, capsys, extra, expected):
    argv = ["train", "--method", "lora", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "o").exists()
