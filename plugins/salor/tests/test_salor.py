"""SALOR: pruned base + SVD repair at init, Eckart-Young, static masks through training, 2:4,
fused == unfused, bitmap round trip and size, portable export in plain PEFT, merge, config, CLI, errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer

import hf_lowrank_plugins as hlp
from hf_lowrank_lora import lora_layers
from hf_lowrank_plugins.testing.helpers import (
    TokenDataset,
    logits,
    make_tiny_model,
    plain_peft_logits,
    rel_err,
    training_args,
)
from hf_lowrank_salor import (
    SalorConfig,
    build_inference_model,
    decode,
    encode,
    is_semi_structured,
    load_compressed_model,
    magnitude_mask,
    sparsity_report,
    truncation_error,
)
from hf_lowrank_salor.bitmap import encoded_bytes, nonzero_bits
from hf_lowrank_salor.fused import FusedGroup
from hf_lowrank_salor.model import cubic_sparsity, iter_adapter_masks

PREFIX = "base_model.model."


def _targets(model):
    return {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    }


def _train(adapted, tmp_path, steps=12, **kw):
    kw.setdefault("learning_rate", 5e-3)
    trainer = Trainer(
        model=adapted.model,
        args=training_args(tmp_path / "run", max_steps=steps, **kw),
        train_dataset=TokenDataset(),
        **adapted.trainer_kwargs(),
    )
    trainer.train()
    adapted.model.eval()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_init_is_pruned_model_plus_rank_r_svd_of_the_residual(batch):
    model = make_tiny_model()
    original = _targets(model)
    adapted = hlp.attach(model, "salor", r=4, lora_alpha=8)  # s = 2, exact SVD, 50% per layer
    layers = lora_layers(adapted.model)
    assert len(layers) == 14
    reference = make_tiny_model()  # the same weights, with W replaced by prune(W) + s*B@A
    ref_modules = dict(reference.named_modules())
    for name, layer in layers.items():
        W = original[name[len(PREFIX) :]]
        mask = magnitude_mask(W, 0.5)
        pruned = torch.where(mask, W, torch.zeros(()))
        assert torch.equal(layer.base_layer.weight, pruned)  # the frozen base is exactly prune(W)
        assert int((pruned == 0).sum()) == W.numel() // 2
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        U, S, Vh = torch.linalg.svd(W - pruned, full_matrices=False)
        E_r = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
        assert (delta - E_r).abs().max() <= 1e-5 * E_r.abs().max()  # s*B@A is the rank-4 SVD of E
        ref_modules[name[len(PREFIX) :]].weight.data.copy_(pruned + delta)
    assert rel_err(logits(adapted.model, batch), logits(reference, batch)) <= 1e-5


def test_eckart_young_bound_and_repair_error_on_tiny_layers():
    model = make_tiny_model()
    original = _targets(model)
    adapted = hlp.attach(model, "salor", r=4)
    for name, layer in lora_layers(adapted.model).items():
        E = original[name[len(PREFIX) :]] - layer.base_layer.weight
        tail, total, bound = truncation_error(E, 4)
        assert tail <= bound < total
        repaired = (
            E - layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        ).detach()
        assert abs(float(repaired.double().pow(2).sum()) - tail) <= 1e-4 * total  # the repair attains the optimum


def test_sparsity_patterns_unstructured_global_and_2_4():
    original = _targets(make_tiny_model())
    adapted = hlp.attach(make_tiny_model(), "salor", r=2, sparsity_pattern="2:4")
    for layer in lora_layers(adapted.model).values():
        kept = layer.base_layer.weight != 0
        assert is_semi_structured(kept) and int(kept.sum()) == kept.numel() // 2
        assert (kept.reshape(-1, 4).sum(-1) == 2).all()
    adapted = hlp.attach(make_tiny_model(), "salor", r=2, sparsity=0.3, sparsity_pattern="global")
    base = {n: layer.base_layer.weight for n, layer in lora_layers(adapted.model).items()}
    zeros = sum(int((w == 0).sum()) for w in base.values())
    total = sum(w.numel() for w in base.values())
    assert zeros == round(0.3 * total)  # exact count overall ...
    per_layer = [float((w == 0).float().mean()) for w in base.values()]
    assert max(per_layer) - min(per_layer) > 0.02  # ... but uneven across layers
    # one threshold: every pruned magnitude is <= every kept magnitude, across layers
    pruned = torch.cat([original[n[len(PREFIX) :]][w == 0].abs() for n, w in base.items()])
    kept = torch.cat([w[w != 0].abs() for w in base.values()])
    assert pruned.max() <= kept.min()
    adapted = hlp.attach(make_tiny_model(), "salor", r=2, sparsity=0.25)
    assert all(abs(v["base"] - 0.25) < 1e-3 for v in sparsity_report(adapted.model).values())


def _sorted_reference_masks(weights, keep):
    """Keep the ``keep`` largest magnitudes over all weights; ties go to the earlier layer, then position
    (a stable sort on the full concatenation: the computation the histograms avoid)."""
    flat = torch.cat([w.detach().abs().float().flatten() for w in weights.values()])
    order = torch.sort(-flat, stable=True).indices[:keep]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order] = True
    out, start = {}, 0
    for n, w in weights.items():
        out[n] = mask[start : start + w.numel()].view(w.shape)
        start += w.numel()
    return out


def test_2_4_ties_are_broken_by_position():
    from hf_lowrank_salor.prune import semi_structured_mask

    weight = torch.tensor([[1.0, 1.0, 1.0, 1.0, -2.0, 0.5, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0, 3.0, 3.0, 1.0, 3.0]])
    expected = [[1, 1, 0, 0, 1, 0, 1, 0], [1, 1, 0, 0, 1, 1, 0, 0]]
    assert semi_structured_mask(weight).int().tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.999])
def test_global_threshold_from_histograms_equals_a_full_sort(dtype, sparsity):
    """The two-pass histogram select keeps exactly the entries a stable sort over every weight keeps,
    including ties (many equal magnitudes, split across layers) and -0.0 / +0.0."""
    from hf_lowrank_salor.prune import _kept, global_masks

    gen = torch.Generator().manual_seed(0)
    weights = {
        "a": torch.randn(48, 64, generator=gen).to(dtype),
        "b": (torch.randint(-3, 4, (32, 40), generator=gen) * 0.25).to(dtype),  # heavy ties, zeros
        "c": torch.randn(64, 16, generator=gen).mul(0.01).to(dtype),
        "d": (torch.randint(-3, 4, (16, 24), generator=gen) * 0.25).to(dtype).t(),  # non-contiguous view
    }
    weights["b"][0, :5] = -0.0
    total = sum(w.numel() for w in weights.values())
    keep = _kept(total, sparsity)
    ours = global_masks(weights, sparsity)
    reference = _sorted_reference_masks(weights, keep)
    assert sum(int(m.sum()) for m in ours.values()) == keep
    for n in weights:
        assert ours[n].shape == weights[n].shape and torch.equal(ours[n], reference[n]), n
    one = magnitude_mask(weights["b"], sparsity)
    assert torch.equal(one, _sorted_reference_masks({"b": weights["b"]}, _kept(weights["b"].numel(), sparsity))["b"])


@pytest.mark.integration
def test_masks_stay_static_and_zero_through_trainer_training(tmp_path):
    adapted = hlp.attach(make_tiny_model(), "salor", r=4, sparsity_target="both", adapter_sparsity=0.5)
    layers = lora_layers(adapted.model)
    base_before = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}
    masks_before = {n: m.clone() for n, _, m in iter_adapter_masks(adapted.model)}
    factors_before = {n: w.detach().clone() for n, w, _ in iter_adapter_masks(adapted.model)}
    assert len(masks_before) == 28 and all(abs(float(m.float().mean()) - 0.5) < 0.02 for m in masks_before.values())
    losses = _train(adapted, tmp_path, lr_scheduler_type="constant", weight_decay=0.1)
    assert losses[-1] < losses[0]
    for n, layer in layers.items():
        assert torch.equal(layer.base_layer.weight, base_before[n])  # frozen base, bit for bit
        assert not layer.base_layer.weight.requires_grad
    for n, w, m in iter_adapter_masks(adapted.model):
        assert torch.equal(m, masks_before[n])  # static schedule: the mask never moves
        assert (w[~m] == 0).all()  # masked entries exactly zero despite momentum and weight decay
        assert not torch.equal(w[m], factors_before[n][m])  # the kept entries trained


def _cubic():
    return hlp.attach(
        make_tiny_model(),
        "salor",
        r=4,
        sparsity_target="adapter",
        adapter_sparsity=0.6,
        adapter_schedule="cubic",
        adapter_schedule_steps=6,
    )


def test_cubic_schedule_ramps_monotonically_to_the_target(tmp_path):
    assert cubic_sparsity(0, 0.5, 8) == 0 and cubic_sparsity(8, 0.5, 8) == 0.5 and cubic_sparsity(20, 0.5, 8) == 0.5
    assert cubic_sparsity(4, 0.5, 8) == pytest.approx(0.5 * (1 - 0.5**3))
    adapted = _cubic()
    assert all(bool(m.all()) for _, _, m in iter_adapter_masks(adapted.model))  # dense at step 0
    _train(adapted, tmp_path, steps=10)
    for _, w, m in iter_adapter_masks(adapted.model):
        assert int((~m).sum()) == round(0.6 * m.numel())
        assert (w[~m] == 0).all()
    report = sparsity_report(adapted.model)
    assert all(v["base"] == 0 for v in report.values())  # adapter-only: the base stays dense


@pytest.mark.integration
def test_a_resumed_cubic_schedule_equals_the_uninterrupted_one(tmp_path):
    """The step hook is hung on the optimizer when training begins, after the Trainer restored the
    checkpoint: it reads its step and masks from the restored state, so resuming mid-ramp (step 4 of 6)
    ends with the uninterrupted run's masks and weights."""
    whole, halves = _cubic(), _cubic()
    _train(whole, tmp_path / "whole", steps=10)
    _train(halves, tmp_path / "halves", steps=10, save_strategy="steps", save_steps=4)
    resumed = _cubic()
    trainer = Trainer(
        model=resumed.model,
        args=training_args(tmp_path / "resumed", max_steps=10, learning_rate=5e-3),
        train_dataset=TokenDataset(),
        **resumed.trainer_kwargs(),
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "halves" / "run" / "checkpoint-4"))
    expected = {n: (w.detach().clone(), m.clone()) for n, w, m in iter_adapter_masks(whole.model)}
    for name, weight, mask in iter_adapter_masks(resumed.model):
        assert torch.equal(mask, expected[name][1]), name
        assert torch.allclose(weight, expected[name][0], atol=1e-6), name


def test_the_step_hook_is_hung_once_and_needs_the_optimizer():
    import types

    import hf_lowrank_salor.plugin as salor_plugin

    adapted = _cubic()
    optimizer = torch.optim.AdamW([p for p in adapted.model.parameters() if p.requires_grad])
    for _ in range(2):  # a second trainer.train() on the same Trainer begins training again
        adapted.begin_training([], optimizer)
    assert len(optimizer._optimizer_step_post_hooks) == 1
    with pytest.raises(hlp.ConfigError, match=r"pass the optimizer you train with"):
        adapted.begin_training([])
    with pytest.raises(hlp.ConfigError, match=r"cubic adapter schedule .* DeepSpeed's master copies undo"):
        args = types.SimpleNamespace(deepspeed="ds_config.json")
        salor_plugin.on_train_begin(adapted.model, adapted.config, optimizer, args, False)


def test_fused_adapters_equal_unfused_outputs(batch):
    adapted = hlp.attach(make_tiny_model(), "salor", r=4, sparsity_target="both")
    with torch.no_grad():  # stand-in for training: move every factor off its init
        g = torch.Generator().manual_seed(0)
        for n, p in adapted.model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    adapted.model.eval()
    from hf_lowrank_salor import apply_adapter_masks

    apply_adapter_masks(adapted.model)
    ref = logits(adapted.model, batch)
    unfused = build_inference_model(adapted.model, fuse=False)
    assert not any(isinstance(m, FusedGroup) for m in unfused.modules())
    assert rel_err(logits(unfused, batch), ref) <= 1e-5
    for base_format in ("dense", "csr"):
        for fuse_base in (False, True):
            fused = build_inference_model(adapted.model, base_format=base_format, fuse_base=fuse_base)
            groups = [m for m in fused.modules() if isinstance(m, FusedGroup)]
            assert len(groups) == 4  # (q, k, v) and (gate, up) in each of 2 layers
            assert rel_err(logits(fused, batch), ref) <= 1e-5, (base_format, fuse_base)
            assert all(g._cache is None for g in groups)  # nothing kept alive after a forward
    with pytest.raises(hlp.IncompatibleError, match="CUDA"):
        build_inference_model(adapted.model, base_format="2:4")


@pytest.mark.parametrize("targets", [None, r".*attn\.c_proj"], ids=["default-targets", "square-c_proj"])
def test_the_inference_model_of_gpt2_conv1d_layers_equals_the_adapted_model(targets):
    """GPT-2's Conv1D stores its weight (in, out): the inference module reads it as (out, in). A square
    layer gave wrong logits silently, the others failed to reshape."""
    from hf_lowrank_plugins.testing.models import GPT2, output

    fields = {} if targets is None else {"target_modules": targets}
    adapted = hlp.attach(GPT2.build(), "salor", r=4, **fields)
    with torch.no_grad():  # stand-in for training: move every factor off its init
        for name, param in adapted.model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    batch = GPT2.batch()
    reference = output(adapted.model, batch)
    for fuse in (False, True):
        assert rel_err(output(build_inference_model(adapted.model, fuse=fuse), batch), reference) <= 1e-5, fuse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitmap_round_trip_is_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(37, 29, generator=g).to(dtype)
    t[torch.rand(t.shape, generator=g) < 0.5] = 0
    t[0, :3] = torch.tensor([-0.0, float("nan"), float("-inf")]).to(dtype)
    bitmap, values = encode(t)
    out = decode(bitmap, values, t.shape)
    ints = {2: torch.int16, 4: torch.int32}[t.element_size()]
    assert out.dtype == dtype and torch.equal(out.view(ints), t.view(ints))  # bit for bit, -0.0 and NaN included
    assert bitmap.numel() == (t.numel() + 7) // 8 and values.numel() == int(nonzero_bits(t).sum())
    # at exactly 50%: 1 bit + half the values = 9/16 of bf16, 17/32 of fp32
    assert encoded_bytes(4096, 2048, 2) / (4096 * 2) == 0.5625
    assert encoded_bytes(4096, 2048, 4) / (4096 * 4) == pytest.approx(17 / 32)


@pytest.mark.integration
def test_exports_portable_compressed_and_merged(tmp_path, batch):
    base_dir = tmp_path / "orig"
    make_tiny_model().save_pretrained(base_dir)
    adapted = hlp.attach(
        AutoModelForCausalLM.from_pretrained(base_dir), "salor", r=4, sparsity_target="both", adapter_sparsity=0.25
    )
    losses = _train(adapted, tmp_path, steps=8)
    assert losses[-1] < losses[0]
    trained = logits(adapted.model, batch)
    result = adapted.export(tmp_path / "out", merge=True)
    out = tmp_path / "out"
    assert set(result.paths()) == {"adapter", "merged", "base", "compressed"}
    # portable: the pruned base as a plain checkpoint + a standard LoRA, loaded by plain PEFT
    plain, config_class = plain_peft_logits(out / "base", out / "adapter", batch, tmp_path)
    assert config_class == "LoraConfig" and rel_err(plain, trained) <= 1e-5
    raw = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert raw["base_model_name_or_path"] == str((out / "base").resolve()) and "sparsity" not in raw
    assert json.loads((out / "adapter" / "hf_lowrank_method.json").read_text())["settings"]["sparsity_target"] == "both"
    # config round trip
    loaded_config = hlp.load_config(out / "adapter")
    assert type(loaded_config) is SalorConfig
    for field in ("r", "lora_alpha", "sparsity", "sparsity_pattern", "sparsity_target", "adapter_sparsity", "svd"):
        assert getattr(loaded_config, field) == getattr(adapted.config, field)
    # merged equals the adapted model
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert rel_err(logits(merged, batch), trained) <= 1e-5
    # compressed: base bit-exact, model output equal, target matrices at 17/32 of fp32
    restored_base = load_compressed_model(out / "compressed", with_adapter=False).state_dict()
    pruned = AutoModelForCausalLM.from_pretrained(out / "base").state_dict()
    assert restored_base.keys() == pruned.keys()
    assert all(torch.equal(restored_base[k].view(torch.int32), v.view(torch.int32)) for k, v in pruned.items())
    restored = load_compressed_model(out / "compressed")
    assert rel_err(logits(restored, batch), trained) <= 1e-5
    sizes = json.loads((out / "compressed" / "sizes.json").read_text())
    assert sizes["encoded_tensors"] == 14
    target = sum(layer.base_layer.weight.numel() for layer in lora_layers(adapted.model).values())
    other = sizes["base_dense_bytes"] - 4 * target
    assert sizes["base_stored_bytes"] - other == target // 8 + 4 * (target // 2)  # 1 bit + fp32 non-zeros


def test_bad_input_is_refused_clearly():
    with pytest.raises(hlp.ConfigError, match=r"sparsity must be a number in \[0, 1\)"):
        hlp.make_config("salor", sparsity=1.0)
    with pytest.raises(hlp.ConfigError, match="adapter_sparsity must be"):
        hlp.make_config("salor", adapter_sparsity=-0.1)
    with pytest.raises(hlp.ConfigError, match="i.e. sparsity 0.5"):
        hlp.make_config("salor", sparsity=0.3, sparsity_pattern="2:4")
    with pytest.raises(hlp.ConfigError, match="sparsity_pattern must be one of"):
        hlp.make_config("salor", sparsity_pattern="4:8")
    with pytest.raises(hlp.ConfigError, match="repair_init='svd' approximates"):
        hlp.make_config("salor", sparsity_target="adapter", repair_init="svd")
    with pytest.raises(hlp.ConfigError, match="adapter_schedule_steps >= 1"):
        hlp.make_config("salor", sparsity_target="adapter", adapter_schedule="cubic")
    for init in ("pissa", "olora", "eva"):  # they rewrite the base before pruning (or need data)
        with pytest.raises(hlp.ConfigError, match=f"init_lora_weights='{init}'.*Use True, False or 'gaussian'"):
            hlp.make_config("salor", init_lora_weights=init)
    odd = make_tiny_model(intermediate_size=130)  # down_proj reads 130 inputs
    with pytest.raises(hlp.ConfigError, match=r"down_proj has 130 inputs .*not divisible by 4"):
        hlp.attach(odd, "salor", r=2, sparsity_pattern="2:4")
    with pytest.raises(hlp.ConfigError, match="larger than the smallest dimension"):
        hlp.attach(make_tiny_model(), "salor", r=40)
    adapted = hlp.attach(make_tiny_model(), "salor", r=2)
    with pytest.raises(hlp.IncompatibleError, match="already carries a PEFT adapter"):
        hlp.attach(adapted.model, "salor", r=2)


def test_4bit_sparse_base_keeps_the_pattern(batch):
    """load_in_4bit: prune + SVD on fp32 W, then NF4 of the pruned base (NF4 has an exact 0)."""
    pytest.importorskip("bitsandbytes")
    from hf_lowrank_salor.export import pruned_base_copy

    fp32 = hlp.attach(make_tiny_model(), "salor", r=4)
    q4 = hlp.attach(make_tiny_model(), "salor", r=4, load_in_4bit=True)
    assert hlp.is_quantized(q4.model)
    layers32, layers4 = lora_layers(fp32.model), lora_layers(q4.model)
    for name, layer in layers32.items():  # the repair was computed from the full-precision residual
        assert torch.equal(layers4[name].lora_A["default"].weight, layer.lora_A["default"].weight)
    deq = dict(pruned_base_copy(q4.model).named_modules())
    for name, layer in layers32.items():
        pruned = layer.base_layer.weight == 0
        assert (deq[name[len(PREFIX) :]].weight[pruned] == 0).all()  # every pruned entry decodes to exactly 0
    assert torch.isfinite(logits(q4.model, batch)).all()
