"""Plain checkpoints written tensor by tensor (``hf_lowrank_plugins.streaming``) against the in-memory
merge: the same tensors (bit for bit where both run PEFT's merge), loadable by plain transformers,
sharded with an index, tied weights once, the base under the adapter with ``merge=False``, and from
disk: a meta-device skeleton whose base tensors are read from the checkpoint as they are written."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.streaming import CheckpointReader, checkpoint_tensors, write_checkpoint
from hf_lowrank_plugins.testing import BERT_CLS, GPT2, LLAMA, T5, output, rel_err

pytestmark = pytest.mark.integration  # end to end: left out of `make test-fast`


CASES = {case.name: case for case in (LLAMA, GPT2, T5, BERT_CLS)}


def _perturbed(case, method, seed=0, **settings):
    """``method`` attached to ``case``'s model with every trainable tensor moved off its initial value."""
    adapted = hlp.attach(case.build(seed), method, **({} if method == "full" else {"r": 4}), **settings)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in adapted.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.05)
    return adapted.model.eval()


def _read(directory):
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def _load(case, directory):
    return getattr(transformers, case.auto_class).from_pretrained(str(directory)).eval()


@pytest.mark.parametrize("case", list(CASES), ids=str)
@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_streamed_merge_equals_the_in_memory_merge(case, method, tmp_path):
    """Same tensor names and values as ``save_pretrained`` of ``merged_copy`` (bit for bit: the same PEFT
    merge runs on a one-layer copy), and plain transformers loads it to the same outputs."""
    model = _perturbed(CASES[case], method)
    write_checkpoint(model, tmp_path / "streamed")
    reference = hlp.merged_copy(model)
    reference.save_pretrained(str(tmp_path / "reference"), safe_serialization=True)
    streamed, saved = _read(tmp_path / "streamed"), _read(tmp_path / "reference")
    assert sorted(streamed) == sorted(saved)
    for key, value in saved.items():
        assert streamed[key].dtype == value.dtype and torch.equal(streamed[key], value), key
    loaded = _load(CASES[case], tmp_path / "streamed")
    batch = CASES[case].batch()
    assert rel_err(output(loaded, batch), output(model, batch)) <= 1e-5
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config["architectures"] == [CASES[case].auto_class] and config["dtype"] == "float32"


@pytest.mark.parametrize("case", ["llama", "gpt2"], ids=str)
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_streamed_merge_of_a_4bit_base_equals_the_dequantized_merge(case, method, tmp_path):
    """A 4-bit base is dequantized layer by layer and merged in full precision: the same weights as the
    whole-model dequantize-then-merge (within fp32 rounding), nothing 4-bit in the checkpoint."""
    pytest.importorskip("bitsandbytes")
    model = _perturbed(CASES[case], method, load_in_4bit=True)
    write_checkpoint(model, tmp_path / "streamed")
    hlp.merged_copy(model).save_pretrained(str(tmp_path / "reference"), safe_serialization=True)
    streamed, saved = _read(tmp_path / "streamed"), _read(tmp_path / "reference")
    assert sorted(streamed) == sorted(saved)
    for key, value in saved.items():
        assert streamed[key].shape == value.shape and streamed[key].dtype == value.dtype, key
        assert rel_err(streamed[key].float(), value.float()) <= 1e-6, key
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert "quantization_config" not in config
    loaded = _load(CASES[case], tmp_path / "streamed")
    batch = CASES[case].batch()
    assert rel_err(output(loaded, batch), output(model, batch)) <= 1e-4


def test_a_plain_peft_lora_on_a_4bit_base_merges_through_the_family_the_registry_finds(tmp_path):
    """A ``peft.LoraConfig`` of PEFT's own (a user's ``get_peft_model`` on a 4-bit model) carries no merge of its
    own: the writer asks the method the registry finds for it (``lora``) and merges in full precision."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    from hf_lowrank_plugins.quantization import quantize_model

    base = quantize_model(LLAMA.build(0), hlp.QuantizationSettings(compute_dtype=torch.float32))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert type(model.peft_config["default"]) is LoraConfig
    model.eval()
    write_checkpoint(model, tmp_path / "streamed")
    batch = LLAMA.batch()
    assert rel_err(output(_load(LLAMA, tmp_path / "streamed"), batch), output(model, batch)) <= 1e-4


@pytest.mark.parametrize("where", ["in_memory", "4bit", "from_disk"])
def test_a_trained_lora_bias_is_merged_as_the_adapter_computes_it(where, tmp_path):
    """``lora_bias=True``: the merged bias is ``b + s b_B``. It was left out (the base bias written as it
    was), and from disk the merge failed on the skeleton's meta bias."""
    if where == "4bit":
        pytest.importorskip("bitsandbytes")
    fields = {"lora_bias": True, "lora_alpha": 8, "load_in_4bit": where == "4bit"}  # r = 4: s = 2
    model = _perturbed(GPT2, "lora", **fields)
    if where == "from_disk":
        GPT2.build(0).save_pretrained(str(tmp_path / "base"))
        hlp.save_adapter(model, tmp_path / "adapter")
        adapted = hlp.load_adapter(_skeleton(GPT2, tmp_path / "base"), tmp_path / "adapter").model
        write_checkpoint(adapted, tmp_path / "merged", source=CheckpointReader(tmp_path / "base"))
    else:
        write_checkpoint(model, tmp_path / "merged")
    batch = GPT2.batch()
    assert rel_err(output(_load(GPT2, tmp_path / "merged"), batch), output(model, batch)) <= 1e-5


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize(
    "settings",
    [
        {"target_modules": ["q_proj"], "trainable_token_indices": [3, 5]},  # PEFT's way to train new tokens
        {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]},
        {"target_modules": ["q_proj", "lm_head"]},
    ],
    ids=["trainable-tokens", "embedding-copy", "lora-on-head"],
)
def test_a_trained_embedding_or_head_merges_in_memory_and_from_disk(settings, tied, tmp_path):
    """Trainable token rows were written under a name no loader knows (the embedding loaded random); a tied
    pair written as two tensors kept ``tie_word_embeddings`` (a loader that ties overwrote the head); from
    disk, the tied head of a trained embedding copy was not found in the checkpoint."""
    from hf_lowrank_plugins.testing.helpers import make_tiny_model

    make_tiny_model(tie_word_embeddings=tied).save_pretrained(str(tmp_path / "base"))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    adapted = hlp.attach(base, "lora", r=4, **settings)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapted.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model = adapted.model.eval()
    write_checkpoint(model, tmp_path / "in_memory")
    loaded = _load(LLAMA, tmp_path / "in_memory")
    loaded.tie_weights()  # what a loader that ties by the config does
    batch = LLAMA.batch()
    assert rel_err(output(loaded, batch), output(model, batch)) <= 1e-5
    hlp.save_adapter(model, tmp_path / "adapter")
    skeleton = hlp.load_adapter(_skeleton(LLAMA, tmp_path / "base"), tmp_path / "adapter").model
    write_checkpoint(skeleton, tmp_path / "from_disk", source=CheckpointReader(tmp_path / "base"))
    from_disk, in_memory = _read(tmp_path / "from_disk"), _read(tmp_path / "in_memory")
    assert sorted(from_disk) == sorted(in_memory)
    assert all(torch.equal(from_disk[key], value) for key, value in in_memory.items())


def test_shards_index_dtype_and_tied_weights(tmp_path):
    """Small shards come with an index naming every tensor once; the tied output head is stored once;
    ``dtype`` casts every floating tensor and the config says so."""
    model = _perturbed(LLAMA, "lora")
    tensors = checkpoint_tensors(model)
    largest = max(t.nbytes for t in tensors)
    write_checkpoint(model, tmp_path, dtype=torch.bfloat16, max_shard_size=2 * largest)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    saved = _read(tmp_path)
    assert set(saved) == set(index["weight_map"]) and all(v.dtype == torch.bfloat16 for v in saved.values())
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in saved.values())
    tied = LLAMA.build().config.tie_word_embeddings
    assert ("lm_head.weight" in saved) is (not tied)
    loaded = _load(LLAMA, tmp_path)
    assert loaded.dtype == torch.bfloat16
    batch = LLAMA.batch()
    assert rel_err(output(loaded, batch), output(model, batch)) <= 2e-2  # bf16 rounding of the weights


def test_merge_false_writes_the_base_under_the_adapter(tmp_path):
    model = _perturbed(GPT2, "lora")
    write_checkpoint(model, tmp_path, merge=False)
    base = _load(GPT2, tmp_path)
    fresh = GPT2.build(0)
    batch = GPT2.batch()
    assert torch.equal(output(base, batch), output(fresh, batch))


def test_a_producer_that_breaks_its_plan_is_an_error(tmp_path):
    from hf_lowrank_plugins.streaming import CheckpointTensor, write_safetensors_file

    wrong = CheckpointTensor("w", (2, 3), torch.float32, lambda: torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="planned"):
        write_safetensors_file([wrong], tmp_path / "x.safetensors")


def _skeleton(case, base_dir):
    """``case``'s model on the meta device (no storage), as ``hf-lowrank merge`` builds it."""
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(str(base_dir))
    with init_empty_weights():
        model = getattr(transformers, case.auto_class)(config)
    model.tie_weights()
    return model


@pytest.mark.parametrize("case", list(CASES), ids=str)
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_from_disk_equals_the_in_memory_merge(case, method, tmp_path):
    """The adapter loaded onto a meta skeleton keeps its real tensors; every base tensor comes from the
    checkpoint when written; the result is bit for bit the in-memory merge (tied weights, Conv1D,
    a classifier's trained head included)."""
    CASES[case].build(0).save_pretrained(str(tmp_path / "base"))
    model = _perturbed(CASES[case], method)
    hlp.save_adapter(model, tmp_path / "adapter")
    write_checkpoint(model, tmp_path / "in_memory")
    adapted = hlp.load_adapter(_skeleton(CASES[case], tmp_path / "base"), tmp_path / "adapter")
    assert not [n for n, p in adapted.model.named_parameters() if "lora_" in n and p.is_meta]
    assert all(p.is_meta for n, p in adapted.model.named_parameters() if n.endswith("base_layer.weight"))
    write_checkpoint(adapted.model, tmp_path / "from_disk", source=CheckpointReader(tmp_path / "base"))
    from_disk, in_memory = _read(tmp_path / "from_disk"), _read(tmp_path / "in_memory")
    assert sorted(from_disk) == sorted(in_memory)
    for key, value in in_memory.items():
        assert from_disk[key].dtype == value.dtype and torch.equal(from_disk[key], value), key


def test_checkpoint_reader_reads_shards_and_refuses_a_truncated_file(tmp_path):
    model = CASES["llama"].build(0).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    reader, saved = CheckpointReader(tmp_path / "sharded"), _read(tmp_path / "sharded")
    assert sorted(reader.names()) == sorted(saved)
    for name, value in saved.items():
        assert reader.shape_dtype(name) == (tuple(value.shape), value.dtype) and torch.equal(reader.read(name), value)
    model.save_pretrained(str(tmp_path / "one"))
    file = tmp_path / "one" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors is truncated"):
        CheckpointReader(tmp_path / "one")


def test_a_skeleton_without_a_source_is_refused():
    model = hlp.attach(_skeleton_of_tiny(), "lora", r=4).model
    with pytest.raises(ValueError, match="is on the meta device and not in the base checkpoint"):
        checkpoint_tensors(model)


def _skeleton_of_tiny():
    from hf_lowrank_plugins.plan import meta_model
    from hf_lowrank_plugins.testing.helpers import tiny_llama_config

    return meta_model(tiny_llama_config())


@pytest.mark.parametrize("method, dtype", [("lora", torch.float32), ("dora", torch.bfloat16), ("qlora", torch.float32)])
def test_hf_lowrank_merge_from_disk_equals_export(method, dtype, tmp_path):
    """The CLI's from-disk merge (skeleton + checkpoint reads) writes what export(merge=True) writes; for QLoRA
    the base is quantized as in training (the merge onto W was another model than the trained deq(NF4(W)))."""
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    import subprocess
    import sys
    from pathlib import Path

    from hf_lowrank_plugins.testing.helpers import make_tiny_model

    make_tiny_model(tie_word_embeddings=True).to(dtype).save_pretrained(str(tmp_path / "base"))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=dtype)
    adapted = hlp.attach(base, method, r=4)
    with torch.no_grad():
        for name, p in adapted.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    adapted.export(tmp_path / "run", merge=True)
    cli = Path(sys.executable).parent / "hf-lowrank"
    subprocess.run(
        [
            str(cli),
            "merge",
            str(tmp_path / "run" / "adapter"),
            "--base",
            str(tmp_path / "base"),
            "--output-dir",
            str(tmp_path / "merged"),
        ],
        check=True,
        capture_output=True,
    )
    from_disk, exported = _read(tmp_path / "merged"), _read(tmp_path / "run" / "merged")
    assert sorted(from_disk) == sorted(exported)
    for key, value in exported.items():
        assert from_disk[key].dtype == value.dtype == dtype and torch.equal(from_disk[key], value), key
    # the same pipeline from Python: hf_lowrank_plugins.merge_adapter, which the CLI calls
    assert hlp.merge_adapter(tmp_path / "run" / "adapter", tmp_path / "from_api", base=tmp_path / "base").is_dir()
    from_api = _read(tmp_path / "from_api")
    assert sorted(from_api) == sorted(exported) and all(torch.equal(from_api[k], v) for k, v in exported.items())
    loaded = hlp.load_adapter(
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=dtype),
        tmp_path / "run" / "adapter",
    )
    batch = LLAMA.batch()
    assert torch.equal(output(loaded.model.eval(), batch), output(adapted.model.eval(), batch))
