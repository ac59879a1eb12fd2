"""Plain LoRA's update added inside its GEMM (``hf_lowrank_lora.fused_add``) against PEFT's own forward."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear

import hf_lowrank_plugins as hlp
from hf_lowrank_lora import FusedAddLoraVariant, FusedLoraLinear, LoraLinearFunction, lora_layers, use_peft_layer_call
from hf_lowrank_plugins.testing.helpers import make_tiny_model, rel_err
from hf_lowrank_plugins.testing.models import GPT2, LLAMA


def _adapted(model, **kw):
    """``lora`` on ``model`` with s = 2 and a non-zero B, so the update shows in every output."""
    adapted = hlp.attach(model, "lora", r=4, lora_alpha=8, **kw)
    generator = torch.Generator().manual_seed(3)
    for layer in lora_layers(adapted.model).values():
        weight = layer.lora_B["default"].weight
        weight.data.copy_(torch.randn(weight.shape, generator=generator).to(weight.dtype) * 0.1)
    return adapted


def _peft_forward(model) -> None:
    """Back to PEFT's plain forward: drop the variant from every layer."""
    for layer in lora_layers(model).values():
        assert isinstance(layer.lora_variant.pop("default"), FusedAddLoraVariant)


@pytest.fixture
def fused_calls(monkeypatch):
    """A list that gets one entry per call of :class:`LoraLinearFunction` (the whole-layer path)."""
    calls: list[int] = []
    original = LoraLinearFunction.apply

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(LoraLinearFunction, "apply", counted)
    return calls


def _loss_and_grads(model, batch, seed: int = 0):
    torch.manual_seed(seed)  # the same dropout masks on both sides
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch, labels=batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def test_every_plain_lora_layer_gets_the_variant(tiny_model):
    adapted = hlp.attach(tiny_model, "lora", r=4)
    layers = lora_layers(adapted.model)
    assert len(layers) == 14
    assert all(type(m.lora_variant["default"]) is FusedAddLoraVariant for m in layers.values())


def test_left_to_peft_where_its_forward_differs():
    # a trained bias is scaled with the product in PEFT's forward: those layers keep PEFT's path
    with_bias = hlp.attach(make_tiny_model(), "lora", r=4, lora_bias=True)
    assert all(not m.lora_variant for m in lora_layers(with_bias.model).values())
    # DoRA keeps its own variant
    dora = hlp.attach(make_tiny_model(), "dora", r=4)
    assert all(not isinstance(m.lora_variant["default"], FusedAddLoraVariant) for m in lora_layers(dora.model).values())


@pytest.mark.parametrize("case", [LLAMA, GPT2], ids=lambda c: c.name)  # GPT-2: transposed Conv1D weights, biases
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_outputs_and_gradients_equal_peft(case, dropout, fused_calls):
    model = _adapted(case.build(), lora_dropout=dropout).model.train()
    batch = case.batch()["input_ids"]
    layers = lora_layers(model)
    assert all(type(m) is FusedLoraLinear and isinstance(m, PeftLoraLinear) for m in layers.values())
    ours, our_grads = _loss_and_grads(model, batch)
    # the whole layer in one node on a Llama without dropout; Conv1D bases and dropout take the variant
    assert len(fused_calls) == (len(layers) if case is LLAMA and dropout == 0 else 0)
    _peft_forward(model)
    theirs, their_grads = _loss_and_grads(model, batch)
    assert rel_err(ours, theirs) <= 1e-6
    assert our_grads.keys() == their_grads.keys() and our_grads
    for name, grad in our_grads.items():
        assert rel_err(grad, their_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_recomputes_the_one_node_layer(use_reentrant, fused_calls):
    """With transformers' gradient checkpointing the one-node layers run again in backward and give
    the gradients of the run without it."""
    batch = LLAMA.batch()["input_ids"]
    plain = _adapted(make_tiny_model()).model.train()
    _, expected = _loss_and_grads(plain, batch)
    checkpointed = _adapted(make_tiny_model()).model.train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed.enable_input_require_grads()  # what PEFT and the Trainer do for reentrant checkpoints
    calls_before = len(fused_calls)
    _, grads = _loss_and_grads(checkpointed, batch)
    assert len(fused_calls) - calls_before == 2 * 14  # each layer's forward, then its recomputation
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert rel_err(grad, expected[name]) <= 1e-6, name


def _trainable_bias(model) -> None:
    for layer in lora_layers(model).values():
        if layer.get_base_layer().bias is not None:  # Llama's attention projections with attention_bias
            layer.get_base_layer().bias.requires_grad_(True)


def _hooked_base(model) -> None:
    for layer in lora_layers(model).values():
        layer.get_base_layer().register_forward_hook(lambda module, args, out: out * 1.5)


def _hooked_factor(model) -> None:
    for layer in lora_layers(model).values():
        layer.lora_A["default"].register_forward_hook(lambda module, args, out: out * 1.5)


@pytest.mark.parametrize(
    "blocker",
    [
        pytest.param(None, id="nothing-in-the-way"),
        pytest.param(_trainable_bias, id="trainable-base-bias"),
        pytest.param(_hooked_base, id="hook-on-base"),
        pytest.param(_hooked_factor, id="hook-on-lora_A"),
        pytest.param("autocast", id="autocast"),
        pytest.param("second-adapter", id="two-active-adapters"),
    ],
)
def test_whole_layer_path_steps_aside_where_it_would_differ(blocker, fused_calls):
    """Each thing the one-node layer leaves out sends the call to PEFT's forward with the variant: the
    same computation bit for bit as on PEFT's own class. With nothing in the way (frozen, non-zero
    biases on every base) all 14 layers take the one-node path, within 1e-6 / 1e-5 of PEFT's forward."""
    model = _adapted(make_tiny_model(attention_bias=True, mlp_bias=True)).model.train()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # transformers initialises biases to zero, which would hide how they are added
        for layer in lora_layers(model).values():
            bias = layer.get_base_layer().bias
            bias.copy_(torch.randn(bias.shape, generator=generator) * 0.1)
    batch = LLAMA.batch()["input_ids"]
    if callable(blocker):
        blocker(model)
    elif blocker == "second-adapter":
        from peft import LoraConfig

        model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
        model.base_model.set_adapter(["default", "other"])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=blocker == "autocast"):
        ours, our_grads = _loss_and_grads(model, batch)
        assert len(fused_calls) == (14 if blocker is None else 0)
        if blocker is None:
            _peft_forward(model)
        else:
            assert use_peft_layer_call(model) == 14
        theirs, their_grads = _loss_and_grads(model, batch)
    if blocker is None:
        assert rel_err(ours, theirs) <= 1e-6
        assert all(rel_err(grad, their_grads[name]) <= 1e-5 for name, grad in our_grads.items())
    else:
        assert torch.equal(ours, theirs)
        assert all(torch.equal(grad, their_grads[name]) for name, grad in our_grads.items())


def test_output_modified_in_place_trains_as_on_peft(batch, fused_calls):
    """A model may modify a projection's output in place (Llama 4's MoE adds into its shared expert's
    ``down_proj`` output). The one-node layer's output allows it, as PEFT's does: the same loss and
    gradients within 1e-6 / 1e-5 of PEFT's forward."""
    model = _adapted(make_tiny_model()).model.train()
    for layer in lora_layers(model).values():
        layer.register_forward_hook(lambda module, args, out: out.mul_(1.5))  # in place, after the layer
    ours, our_grads = _loss_and_grads(model, batch)
    assert len(fused_calls) == 14
    _peft_forward(model)
    theirs, their_grads = _loss_and_grads(model, batch)
    assert rel_err(ours, theirs) <= 1e-6
    assert all(rel_err(grad, their_grads[name]) <= 1e-5 for name, grad in our_grads.items())


def test_second_derivative_raises_rather_than_being_wrong(batch):
    """The one-node layer keeps ``x`` and ``s x A^T`` without their graph, so a gradient of a gradient
    through it would leave out terms: it raises instead (PEFT's layer call gives the right one)."""
    model = _adapted(make_tiny_model()).model.train()
    factor = next(iter(lora_layers(model).values())).lora_A["default"].weight
    (grad,) = torch.autograd.grad(model(input_ids=batch, labels=batch).loss, factor, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.pow(2).sum().backward()


def test_four_bit_base_equals_peft(batch):
    pytest.importorskip("bitsandbytes")
    model = _adapted(make_tiny_model(), load_in_4bit=True).model.train()
    assert all(type(m).__name__ == "Linear4bit" for m in lora_layers(model).values())
    ours, our_grads = _loss_and_grads(model, batch)
    _peft_forward(model)
    theirs, their_grads = _loss_and_grads(model, batch)
    assert rel_err(ours, theirs) <= 1e-6
    for name, grad in our_grads.items():
        assert rel_err(grad, their_grads[name]) <= 1e-5, name


def test_mixed_adapter_batch_equals_peft(tiny_model, batch):
    model = _adapted(tiny_model).model.eval()
    names = ["default", "__base__"]  # one row adapted, one row the base model
    with torch.no_grad():
        ours = model(input_ids=batch, adapter_names=names).logits
        _peft_forward(model)
        theirs = model(input_ids=batch, adapter_names=names).logits
        with model.disable_adapter():
            base = model(input_ids=batch).logits
    assert rel_err(ours, theirs) <= 1e-6
    assert torch.equal(ours[1], base[1]) and not torch.allclose(ours[0], base[0])


@pytest.mark.parametrize("safe_merge", [True, False])
def test_merge_and_unmerge_equal_peft(safe_merge):
    ours, theirs = _adapted(make_tiny_model()).model, _adapted(make_tiny_model()).model
    _peft_forward(theirs)
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    for model in (ours, theirs):
        model.base_model.merge_adapter(safe_merge=safe_merge)
    merged = dict(ours.named_parameters())
    for name, param in theirs.named_parameters():
        if "base_layer" in name:
            assert torch.equal(merged[name], param), name  # the same delta, added the same way
    ours.base_model.unmerge_adapter()
    for name, param in ours.named_parameters():
        if name in before:
            assert rel_err(param, before[name]) <= 1e-6, name


def test_lower_precision_base_sums_in_the_adapter_dtype(batch):
    # PEFT keeps fp32 adapters on a bf16 base, sums in fp32 and rounds the sum to bf16 once
    model = _adapted(make_tiny_model().to(torch.bfloat16)).model.eval()
    layer = next(iter(lora_layers(model).values()))
    assert (
        layer.get_base_layer().weight.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    )
    with torch.no_grad():
        ours = model(input_ids=batch).logits
        _peft_forward(model)
        theirs = model(input_ids=batch).logits
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert rel_err(ours.float(), theirs.float()) <= 1e-2  # the same sums, rounded to bf16 in each layer


def test_full_precision_base_output_is_not_rounded_to_a_16_bit_adapter(batch):
    """An fp32 base with bf16 adapters: PEFT adds the bf16 update to the fp32 base output, in fp32, and
    so do we (the base output was rounded to bf16 once). With ``B = 0`` the output is the base
    model's bit for bit (the old sum in bf16 rounded it); with a trained ``B``, as close to the same
    factors in fp32 as PEFT's forward is (both round the input and ``A x`` to bf16; about 6e-3)."""
    import copy

    model = hlp.attach(make_tiny_model(), "lora", r=4, lora_alpha=8).model.eval()
    for layer in lora_layers(model).values():
        for factor in (layer.lora_A["default"], layer.lora_B["default"]):
            factor.to(torch.bfloat16)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=batch).logits
        assert torch.equal(model(input_ids=batch).logits, base)  # B = 0 at initialisation
        generator = torch.Generator().manual_seed(3)
        for layer in lora_layers(model).values():
            weight = layer.lora_B["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
        ours = model(input_ids=batch).logits
        _peft_forward(model)
        theirs = model(input_ids=batch).logits
        exact = copy.deepcopy(model).float()(input_ids=batch).logits  # the same bf16 values, in fp32
    assert ours.dtype == theirs.dtype == torch.float32 and not torch.equal(ours, base)
    assert rel_err(ours, exact) <= 1e-2 and rel_err(theirs, exact) <= 1e-2


def test_partitioned_weight_goes_through_its_module(tiny_model, batch):
    # DeepSpeed ZeRO-3 gathers a partitioned weight only inside its module's call (the weight carries ``ds_id``)
    model = _adapted(tiny_model).model.eval()
    with torch.no_grad():
        fused = model(input_ids=batch).logits
    calls = []
    for layer in lora_layers(model).values():
        layer.lora_B["default"].weight.ds_id = 0
        layer.lora_B["default"].register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        through_module = model(input_ids=batch).logits
    assert len(calls) == 14 and rel_err(through_module, fused) <= 1e-6
