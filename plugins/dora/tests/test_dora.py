"""DoRA: identity at init, detached norm, training, merged export, 4-bit base, fast inference."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer

import hf_lowrank_plugins as hlp
from hf_lowrank_lora import lora_layers
from hf_lowrank_plugins.testing.helpers import logits, make_tiny_model, rel_err, training_args


def _train(adapted, tmp_path, dataset, **kw):
    trainer = Trainer(
        model=adapted.model,
        args=training_args(tmp_path / "run", **kw),
        train_dataset=dataset,
        **adapted.trainer_kwargs(),
    )
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_identity_at_init_and_trainable_parameters(tiny_model, batch):
    ref = logits(tiny_model, batch)
    adapted = hlp.attach(tiny_model, "dora", r=4)
    assert type(adapted.config).__name__ == "DoraConfig" and adapted.config.use_dora
    assert rel_err(logits(adapted.model, batch), ref) <= 1e-5
    names = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
    # 14 linear layers x (A, B, magnitude)
    assert len([n for n in names if "lora_magnitude_vector" in n]) == 14 and len(names) == 42
    layer = adapted.model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.allclose(layer.lora_magnitude_vector["default"].weight, layer.base_layer.weight.norm(dim=1))


def test_use_dora_false_is_refused():
    with pytest.raises(hlp.ConfigError, match="use_dora=True"):
        hlp.make_config("dora", use_dora=False)


def test_magnitude_gets_gradient_and_weight_norm_is_detached():
    """PEFT's gradients equal a hand-written DoRA whose norm ||W + s*B@A|| is a constant (paper 4.3)."""
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(12, 10, bias=False))
    cfg = LoraConfig(r=3, lora_alpha=6, use_dora=True, target_modules=["0"])
    model = get_peft_model(lin, cfg)
    layer = model.base_model.model[0]
    with torch.no_grad():  # non-zero B so the norm depends on the adapter
        layer.lora_B["default"].weight.normal_(0, 0.3)
        layer.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 1.5, 10))
    x, target = torch.randn(5, 12), torch.randn(5, 10)
    torch.nn.functional.mse_loss(model(x), target).backward()

    W = layer.base_layer.weight.detach()
    A = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    B = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    m = layer.lora_magnitude_vector["default"].weight.detach().clone().requires_grad_()
    s = layer.scaling["default"]

    def manual(detach: bool):
        V = W + s * B @ A
        norm = V.norm(dim=1)
        norm = norm.detach() if detach else norm
        return torch.nn.functional.mse_loss(x @ (m[:, None] * V / norm[:, None]).T, target)

    gA, gB, gm = torch.autograd.grad(manual(detach=True), (A, B, m))
    gA_full, gB_full, _ = torch.autograd.grad(manual(detach=False), (A, B, m))
    peft_gm = layer.lora_magnitude_vector["default"].weight.grad
    assert peft_gm is not None and peft_gm.abs().max() > 0
    assert torch.allclose(peft_gm, gm, atol=1e-6, rtol=1e-5)
    assert torch.allclose(layer.lora_A["default"].weight.grad, gA, atol=1e-6, rtol=1e-5)
    assert torch.allclose(layer.lora_B["default"].weight.grad, gB, atol=1e-6, rtol=1e-5)
    # and it is not the gradient through the norm (the test can tell the two apart)
    assert (layer.lora_B["default"].weight.grad - gB_full).abs().max() > 1e-3
    assert (layer.lora_A["default"].weight.grad - gA_full).abs().max() > 1e-4


def test_trains_with_plain_trainer_and_merged_export_matches(batch, token_dataset, tmp_path):
    adapted = hlp.attach(make_tiny_model(), "dora", r=4)
    losses = _train(adapted, tmp_path, token_dataset)
    assert losses[-1] < losses[0] - 0.05
    mag = adapted.model.base_model.model.model.layers[0].mlp.up_proj.lora_magnitude_vector["default"].weight
    base_norm = adapted.model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.norm(dim=1)
    assert (mag - base_norm).abs().max() > 1e-4  # the magnitude itself trained
    adapted.model.eval()
    trained = logits(adapted.model, batch)
    result = adapted.export(tmp_path / "out", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert (logits(merged, batch) - trained).abs().max() <= 1e-4
    # the adapter reloads as DoRA onto a fresh base (use_dora is in adapter_config.json)
    reloaded = hlp.load_adapter(make_tiny_model(), result.adapter_dir)
    assert reloaded.method.name == "dora" and reloaded.config.use_dora
    assert (logits(reloaded.model, batch) - trained).abs().max() <= 1e-5


def test_fast_inference_cache_and_merge_give_the_same_logits(batch, token_dataset, tmp_path):
    from hf_lowrank_dora import cache_for_inference, fast_inference

    adapted = hlp.attach(make_tiny_model(), "dora", r=4)
    _train(adapted, tmp_path, token_dataset, max_steps=3)
    adapted.model.eval()
    ref = logits(adapted.model, batch)
    with fast_inference(adapted.model, mode="cache") as m:
        first, second = logits(m, batch), logits(m, batch)
        layer = m.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"]
        assert layer._dora_cache  # norms and B@A were cached
    assert (first - ref).abs().max() <= 1e-5 and torch.equal(first, second)
    with fast_inference(adapted.model, mode="merge") as m:
        assert (logits(m, batch) - ref).abs().max() <= 1e-4
    # unmerged again; unmerging subtracts the update back, so equal up to float rounding
    assert (logits(adapted.model, batch) - ref).abs().max() <= 1e-5
    cache_for_inference(adapted.model)
    try:
        assert (logits(adapted.model, batch) - ref).abs().max() <= 1e-5
    finally:
        cache_for_inference(adapted.model, enabled=False)


def test_qdora_trains_on_4bit_base_and_merges_dequantized(batch, token_dataset, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from hf_lowrank_dora import fast_inference

    adapted = hlp.attach(make_tiny_model(), "dora", r=4, load_in_4bit=True)
    assert sum(type(m) is bnb.nn.Linear4bit for m in adapted.model.modules()) == 14
    losses = _train(adapted, tmp_path, token_dataset)
    assert losses[-1] < losses[0] - 0.05
    adapted.model.eval()  # the qlora plugin disabled bnb's bf16 CPU repacking: eval is exact too
    trained = logits(adapted.model, batch)
    result = adapted.export(tmp_path / "out", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert merged.dtype == torch.float32 and not hlp.is_quantized(merged)
    # merged W = deq(Q(W)) with DoRA folded in, in fp32: only float rounding separates the two
    assert (logits(merged, batch) - trained).abs().max() <= 1e-4
    with fast_inference(adapted.model, mode="cache") as m:
        assert (logits(m, batch) - trained).abs().max() <= 1e-5
    with pytest.raises(hlp.IncompatibleError, match="mode='cache'"):
        with fast_inference(adapted.model, mode="merge"):
            pass


def _dora_pair(model_case, dropout=0.0, four_bit=False):
    """Our DoRA and PEFT's on copies of one base, with the same non-identity factors (B != 0, m != ||W||)."""
    import copy

    from peft import LoraConfig, get_peft_model

    base = model_case.build()
    ours = hlp.attach(copy.deepcopy(base), "dora", r=4, lora_alpha=8, lora_dropout=dropout, load_in_4bit=four_bit).model
    reference_base = copy.deepcopy(base)
    if four_bit:
        from hf_lowrank_plugins.quantization import quantize_model

        reference_base = quantize_model(
            reference_base, hlp.QuantizationSettings.from_config(ours.peft_config["default"])
        )
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        use_dora=True,
        target_modules="all-linear",
        fan_in_fan_out=model_case.name == "gpt2",
    )
    theirs = get_peft_model(reference_base, config)
    torch.manual_seed(3)
    with torch.no_grad():
        their_params = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
                their_params[name].copy_(p)
    return ours, theirs


def _forward_backward(model, batch):
    model.train()
    torch.manual_seed(7)  # the same dropout masks
    out = model(**batch).logits
    out.double().pow(2).mean().backward()
    return out.detach().double(), {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}


def _grad_error(grads, reference):
    """The worst norm-wise relative error over the parameters: ||g - g_ref|| / ||g_ref||."""
    return max(float((grads[n] - reference[n]).norm() / reference[n].norm()) for n in grads)


def _model_case(case: str):
    """The conformance model of ``case``; ``llama-bias``: the tiny Llama with biases on every projection."""
    import types

    from hf_lowrank_plugins.testing import GPT2, LLAMA

    def with_biases():
        model = make_tiny_model(attention_bias=True, mlp_bias=True)
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():  # transformers initialises biases to zero, which would hide how they are added
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        return model

    if case == "llama-bias":
        return types.SimpleNamespace(name=case, build=with_biases, batch=LLAMA.batch)
    return GPT2 if case == "gpt2" else LLAMA


@pytest.mark.parametrize("case", ["llama", "llama-bias", "gpt2", "llama-dropout", "llama-4bit"])
def test_low_rank_norms_equal_peft_dora(case):
    """Our DoRA layers (row norms from W A^T and A A^T) against PEFT's (dense W + s B A), same factors:
    outputs within 1e-5; gradients within 2e-6 norm-wise (both are fp32: see the float64 test for who is closer)."""
    from peft.tuners.lora.dora import DoraLinearLayer

    from hf_lowrank_dora.lowrank_norm import LowRankDoraLinearLayer, LowRankDoraLinearVariant

    model_case = _model_case(case)
    ours, theirs = _dora_pair(
        model_case, dropout=0.1 if case == "llama-dropout" else 0.0, four_bit=case == "llama-4bit"
    )
    assert any(isinstance(m, LowRankDoraLinearLayer) for m in ours.modules())
    assert all(
        type(v) is LowRankDoraLinearVariant for m in ours.modules() for v in getattr(m, "lora_variant", {}).values()
    )
    assert not any(type(m) is DoraLinearLayer for m in ours.modules())
    batch = model_case.batch()
    (out_ours, g_ours), (out_theirs, g_theirs) = _forward_backward(ours, batch), _forward_backward(theirs, batch)
    assert rel_err(out_ours, out_theirs) <= 1e-5
    # biases make the fp32 gradients noisier: PEFT's own are 3.7e-6 off its float64 ones there
    assert _grad_error(g_ours, g_theirs) <= (1e-5 if case == "llama-bias" else 2e-6)


@pytest.mark.parametrize("four_bit", [False, True])
def test_base_row_norms_are_computed_at_attach_and_reused_by_training(four_bit):
    """``||W_i||^2`` is computed once, at attach (not between the first forward's activations), and
    training forwards reuse it, a 4-bit base too (whose weight is dequantized afresh every call)."""
    if four_bit:
        pytest.importorskip("bitsandbytes")
    from hf_lowrank_dora.lowrank_norm import LowRankDoraLinearLayer
    from hf_lowrank_plugins.testing import LLAMA

    model = hlp.attach(LLAMA.build(), "dora", r=4, load_in_4bit=four_bit).model
    layers = [m for m in model.modules() if isinstance(m, LowRankDoraLinearLayer)]
    cached = [layer._w_sq[1] for layer in layers]
    model.train()
    model(**LLAMA.batch()).logits.sum().backward()
    assert all(layer._w_sq[1] is tensor for layer, tensor in zip(layers, cached, strict=True))


def test_a_trained_base_weight_written_through_data_is_read_afresh():
    """Where the base weight itself trains, ``||W_i||^2`` is not cached: optimizers that write through
    ``.data`` (DeepSpeed's) or raw pointers (bitsandbytes' 8-bit) leave its version counter alone, so a
    cache keyed on it would keep the old norms. After such a write our outputs still equal PEFT's DoRA
    within 1e-5, on the same written weights."""
    ours, theirs = _dora_pair(_model_case("llama"))
    batch = _model_case("llama").batch()
    generator = torch.Generator().manual_seed(11)
    for model in (ours, theirs):
        model.requires_grad_(True)  # the whole model trains, base weights included
        _forward_backward(model, batch)  # a first step's forward fills whatever it caches
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        if "base_layer.weight" in name:
            update = torch.randn(p.shape, generator=generator) * 0.05
            p.data.add_(update)  # as an optimizer outside autograd writes it: the version stays
            q.data.add_(update)
    assert rel_err(_forward_backward(ours, batch)[0], _forward_backward(theirs, batch)[0]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_initial_magnitudes_are_pefts_and_the_model_equals_its_base_bit_for_bit(dtype):
    """The magnitudes our attach computes from low-rank pieces equal PEFT's dense ``||W + s B A||`` (same
    dtype; within 1e-6 in fp32, one rounding in bf16), PEFT's dense norm is never called, its variant
    module is left as it was, and in fp32 the adapted model's logits at initialisation are the base's
    bit for bit (m/n is exactly 1)."""
    import copy
    from unittest import mock

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import variants as peft_variants
    from peft.tuners.lora.dora import DoraLinearLayer

    from hf_lowrank_plugins.testing import LLAMA

    base = LLAMA.build().to(dtype)
    batch = LLAMA.batch()
    with torch.no_grad():
        expected_logits = base(**batch).logits
    theirs = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear")
    )
    with mock.patch.object(DoraLinearLayer, "get_weight_norm", side_effect=AssertionError("dense norm")):
        ours = hlp.attach(copy.deepcopy(base), "dora", r=4, lora_alpha=8).model
    assert peft_variants.DoraLinearLayer is DoraLinearLayer
    their_magnitudes = {n: p for n, p in theirs.named_parameters() if "lora_magnitude_vector" in n}
    our_magnitudes = {n: p for n, p in ours.named_parameters() if "lora_magnitude_vector" in n}
    assert their_magnitudes.keys() == our_magnitudes.keys() and our_magnitudes
    for name, mine in our_magnitudes.items():
        assert mine.dtype == their_magnitudes[name].dtype
        rtol = 1e-6 if dtype == torch.float32 else 2**-8  # bf16: one unit in the last place
        torch.testing.assert_close(mine, their_magnitudes[name], rtol=rtol, atol=0)
    if dtype == torch.float32:
        with torch.no_grad():
            assert torch.equal(ours(**batch).logits, expected_logits)


@pytest.mark.parametrize("case", ["llama", "llama-bias", "llama-dropout", "gpt2"])
def test_one_node_layer_where_nothing_needs_the_base_call(case, monkeypatch):
    """Our DoRA layers compute the whole layer in one autograd node (``DoraLinearFunction``) on a Llama
    without dropout (with or without biases), all 14 of them, and take the variant's path for dropout
    and GPT-2's Conv1D. Where fused: outputs equal the variant path's within 1e-6, and against PEFT's
    DoRA in float64 the gradients are no further off than PEFT's own fp32 ones (and within 1e-5 of
    the variant path's; with biases the fp32 gradients differ by a few 1e-6 whichever way they are taken)."""
    import copy

    from hf_lowrank_dora.lowrank_norm import DoraLinearFunction
    from hf_lowrank_lora import use_peft_layer_call

    calls: list[int] = []
    original = DoraLinearFunction.apply
    monkeypatch.setattr(DoraLinearFunction, "apply", lambda *args: calls.append(1) or original(*args))
    model_case = _model_case(case)
    ours, theirs = _dora_pair(model_case, dropout=0.1 if case == "llama-dropout" else 0.0)
    batch = model_case.batch()
    out_fused, grads_fused = _forward_backward(ours, batch)
    fused = case in ("llama", "llama-bias")
    assert len(calls) == (14 if fused else 0)
    if fused:
        _, truth = _forward_backward(copy.deepcopy(theirs).double(), batch)
        peft_error = _grad_error(_forward_backward(theirs, batch)[1], truth)
        assert _grad_error(grads_fused, truth) <= 1.5 * peft_error, (_grad_error(grads_fused, truth), peft_error)
        assert use_peft_layer_call(ours) == 14  # PEFT's layer call with our variant
        ours.zero_grad(set_to_none=True)
        out_variant, grads_variant = _forward_backward(ours, batch)
        assert len(calls) == 14
        assert rel_err(out_fused, out_variant) <= 1e-6
        assert _grad_error(grads_fused, grads_variant) <= 1e-5


def test_low_rank_norms_are_as_exact_as_peft_against_float64():
    """Against PEFT's DoRA computed in float64, our fp32 gradients are within 1e-6 (norm-wise) and no further
    off than PEFT's own fp32 gradients (the two fp32 versions differ from each other by about that much)."""
    import copy

    from hf_lowrank_plugins.testing import LLAMA

    batch = LLAMA.batch()
    ours, theirs = _dora_pair(LLAMA)
    _, truth = _forward_backward(copy.deepcopy(theirs).double(), batch)
    ours_error = _grad_error(_forward_backward(ours, batch)[1], truth)
    peft_error = _grad_error(_forward_backward(theirs, batch)[1], truth)
    assert ours_error <= 1e-6 and ours_error <= 1.5 * peft_error, (ours_error, peft_error)


@pytest.mark.parametrize("with_bias", [False, True])
def test_dora_output_keeps_one_activation_for_backward_and_equals_peft_expression(with_bias):
    """``dora_output`` of ``base + lora`` against PEFT's expression ``base + (k - 1) (base - bias) + k lora``
    (``k = m/n``) in float64: the same output and the same gradients for base, lora, magnitude and bias,
    and one saved activation-sized tensor where autograd's graph of PEFT's expression keeps two."""
    from hf_lowrank_dora.lowrank_norm import dora_output

    def from_sum(base, lora, magnitude, norm, bias):
        return dora_output(base + lora, magnitude, norm, bias)  # the forward's addmm takes this sum

    generator = torch.Generator().manual_seed(0)
    base, lora = (torch.randn(3, 5, 8, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(2))
    norm = 1 + torch.rand(8, generator=generator, dtype=torch.float64)
    magnitude = (norm * (1 + 0.1 * torch.randn(8, generator=generator, dtype=torch.float64))).requires_grad_()
    bias = torch.randn(8, generator=generator, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = (base, lora, magnitude, norm, bias)
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    upstream = torch.randn(3, 5, 8, generator=generator, dtype=torch.float64)

    def peft_expression(base, lora, magnitude, norm, bias):
        scale = magnitude / norm
        return base + (scale - 1) * (base if bias is None else base - bias) + scale * lora

    def output_and_grads(fn):
        out = fn(*inputs)
        return out.detach(), torch.autograd.grad(out, leaves, upstream)

    (ours, our_grads), (theirs, their_grads) = output_and_grads(from_sum), output_and_grads(peft_expression)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for mine, reference in zip(our_grads, their_grads, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-12)

    def saved_activations(fn) -> int:
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
            fn(*inputs)
        return sum(shape == base.shape for shape in shapes)

    assert saved_activations(from_sum) == 1
    assert saved_activations(peft_expression) == 2


@pytest.mark.parametrize("four_bit", [False, True])
@pytest.mark.integration
def test_training_forward_compiles_to_one_graph_that_reads_the_weight_as_it_is(four_bit):
    """Under ``torch.compile`` DoRA's training forward is one graph: no graph break in any layer (with
    two per layer, from PEFT's weight helper and from checking the cached ``||W_i||^2`` against its
    weight, DoRA compiled ran at 0.71x its eager speed). Its loss and gradients equal eager's, and the compiled forward takes the base
    row norms from the weight as it is at each call: after a base weight is changed in place between
    two compiled calls, compiled and eager outputs still agree. On a 4-bit base (QDoRA) too, whose
    weight is dequantized by bitsandbytes' own function (PEFT's helper broke the graph)."""
    if four_bit:
        pytest.importorskip("bitsandbytes")
    import torch._dynamo

    from hf_lowrank_plugins.testing import LLAMA

    model = hlp.attach(LLAMA.build(), "dora", r=4, load_in_4bit=four_bit).model
    model.train()
    batch = LLAMA.batch()
    explained = torch._dynamo.explain(model)(**batch)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")  # dynamo and AOT autograd, without inductor's codegen

    def loss_and_grads(module):
        model.zero_grad(set_to_none=True)
        loss = module(**batch).logits.square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    for _ in range(2):
        # compiled first: an eager call before it would refresh a cache the graph might read
        (loss_compiled, grads_compiled), (loss_eager, grads_eager) = loss_and_grads(compiled), loss_and_grads(model)
        assert rel_err(loss_compiled, loss_eager) <= 1e-6
        assert max(rel_err(c, e) for c, e in zip(grads_compiled, grads_eager, strict=True)) <= 1e-5
        if not four_bit:
            with torch.no_grad():  # the second round runs on a changed base weight
                model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.add_(0.05)


@pytest.mark.parametrize("precision", ["float16", "bfloat16", "autocast-float16", "autocast-bfloat16"])
def test_sixteen_bit_row_norms_are_summed_in_fp32(precision):
    """In 16 bits (the adapters too, as after ``model.half()`` or under DeepSpeed's bf16) and for an fp32
    model under 16-bit autocast, DoRA's row norms are summed in fp32, as PEFT's are: a row of norm 300,
    whose square (9e4) overflows fp16, keeps its output (summed in 16 bits, its norm was infinite and
    the row became its bias alone). At initialisation, biases included, the model is its base bit for
    bit, as PEFT's is; with trained factors, every layer's output is within 1.5x PEFT's own error
    against PEFT's DoRA in float64 (the two round differently; the median ratio is about 1)."""
    import copy

    dtype = torch.bfloat16 if precision.endswith("bfloat16") else torch.float16
    autocast = precision.startswith("autocast")
    base = _model_case("llama-bias").build()
    with torch.no_grad():
        for layer in base.model.layers:
            row = layer.mlp.down_proj.weight[0]
            row.mul_(300 / row.norm())
    if not autocast:
        base = base.to(dtype)
    batch = _model_case("llama-bias").batch()
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear")
    ours = hlp.attach(copy.deepcopy(base), "dora", r=4, lora_alpha=8).model.to(base.dtype)
    theirs = get_peft_model(copy.deepcopy(base), config).to(base.dtype)
    truth = get_peft_model(copy.deepcopy(base).double(), config)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=autocast):
        expected = base(**batch).logits
        assert torch.equal(ours(**batch).logits, expected) and torch.equal(theirs(**batch).logits, expected)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        their_params, true_params = dict(theirs.named_parameters()), dict(truth.named_parameters())
        for name, param in ours.named_parameters():
            if param.requires_grad:
                param.add_((torch.randn(param.shape, generator=generator) * 0.05).to(param.dtype))
                their_params[name].copy_(param)
                true_params[name].copy_(param)
    our_layers, their_layers, true_layers = lora_layers(ours), lora_layers(theirs), lora_layers(truth)
    for name, layer in our_layers.items():
        x = torch.randn(4, 8, layer.in_features, generator=generator).to(base.dtype)
        with torch.no_grad():
            with torch.autocast("cpu", dtype=dtype, enabled=autocast):
                mine, reference = layer(x).double(), their_layers[name](x).double()
            exact = true_layers[name](x.double())
        assert torch.isfinite(mine).all(), name
        assert rel_err(mine, exact) <= 1.5 * rel_err(reference, exact), name


def test_one_node_layer_output_may_be_modified_in_place():
    """A model may modify a projection's output in place (Llama 4's MoE adds into its shared expert's
    ``down_proj`` output); the one-node layer's output allows it, as PEFT's does: outputs and
    gradients equal PEFT's DoRA within 1e-5 and 2e-6."""
    from hf_lowrank_plugins.testing import LLAMA

    ours, theirs = _dora_pair(LLAMA)
    for model in (ours, theirs):
        for layer in lora_layers(model).values():
            layer.register_forward_hook(lambda module, args, out: out.mul_(1.5))
    batch = LLAMA.batch()
    (out_ours, g_ours), (out_theirs, g_theirs) = _forward_backward(ours, batch), _forward_backward(theirs, batch)
    assert rel_err(out_ours, out_theirs) <= 1e-5
    assert _grad_error(g_ours, g_theirs) <= 2e-6


def test_one_node_layer_refuses_a_second_derivative():
    """The one-node layer keeps ``x``, ``s x A^T`` and ``c`` without their graph, so a gradient of a
    gradient through it would leave out terms: it raises instead of returning a wrong one."""
    from hf_lowrank_plugins.testing import LLAMA

    ours, _ = _dora_pair(LLAMA)
    ours.train()
    factor = next(iter(lora_layers(ours).values())).lora_A["default"].weight
    (grad,) = torch.autograd.grad(ours(**LLAMA.batch()).logits.pow(2).mean(), factor, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.pow(2).sum().backward()


@pytest.mark.parametrize("hooked", ["lora_A", "lora_magnitude_vector"])
def test_hooks_on_the_adapters_modules_get_pefts_calls(hooked):
    """A forward hook on an adapter's own module (``lora_A``, or DoRA's magnitude layer) runs where PEFT's
    DoRA calls that module: our layers then take PEFT's DoRA forward, bit for bit PEFT's outputs."""
    from hf_lowrank_plugins.testing import LLAMA

    ours, theirs = _dora_pair(LLAMA)
    calls = {"ours": 0, "theirs": 0}

    def hook(side):
        def scale(module, args, out):
            calls[side] += 1
            return out * 1.5

        return scale

    for side, model in (("ours", ours), ("theirs", theirs)):
        for layer in lora_layers(model).values():
            getattr(layer, hooked)["default"].register_forward_hook(hook(side))
    batch = LLAMA.batch()
    out_ours, out_theirs = _forward_backward(ours, batch)[0], _forward_backward(theirs, batch)[0]
    assert calls["ours"] == calls["theirs"] > 0
    assert torch.equal(out_ours, out_theirs)


def test_a_data_dependent_init_that_writes_the_base_through_data_is_seen():
    """A method built on DoRA whose ``on_train_begin`` rewrites the frozen base weights through
    ``param.data.copy_`` (what the hook specification asks for) leaves their version counters alone;
    ``begin_training`` advances them, so the next forward takes ``||W_i||^2`` of the new weights:
    the logits equal those of a copy that computes everything afresh."""
    import copy

    import hf_lowrank_dora.plugin as dora_plugin
    from hf_lowrank_dora import DoraConfig
    from hf_lowrank_plugins.testing import LLAMA

    class RescaledBase:
        cfg = type("RescaledBaseConfig", (DoraConfig,), {})

        @hlp.hookimpl
        def describe_methods(self):
            return [hlp.MethodInfo(name="rescaled_dora", config_class=self.cfg)]

        @hlp.hookimpl
        def init_adapter(self, model, config):
            return dora_plugin.init_adapter(model, config)

        @hlp.hookimpl
        def on_train_begin(self, model, config):
            for layer in lora_layers(model).values():
                weight = layer.get_base_layer().weight
                weight.data.copy_(weight * 1.5)
            return True

    registry = hlp.Registry(autoload=False)
    registry.register(RescaledBase(), name="rescaled_dora")
    adapted = hlp.attach(LLAMA.build(), "rescaled_dora", r=4, registry=registry)
    batch = LLAMA.batch()
    before = logits(adapted.model, batch["input_ids"])
    assert adapted.begin_training([batch])
    after, afresh = logits(adapted.model, batch["input_ids"]), logits(copy.deepcopy(adapted.model), batch["input_ids"])
    assert torch.equal(after, afresh) and not torch.allclose(after, before)
