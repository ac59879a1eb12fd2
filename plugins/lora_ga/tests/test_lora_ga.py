"""LoRA-GA: streaming gradient estimate, init formulas, identity, Trainer runs, resume, export, DDP, errors."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

import hf_lowrank_plugins as hlp
from hf_lowrank_lora import lora_layers
from hf_lowrank_lora_ga import plugin as ga_plugin
from hf_lowrank_lora_ga.gradient import collect_batches, estimate_gradient_factors
from hf_lowrank_plugins.testing.helpers import (
    TORCHRUN_TWO_PROCESSES,
    TokenDataset,
    logits,
    make_tiny_model,
    plain_peft_logits,
    rel_err,
    training_args,
)
from hf_lowrank_plugins.testing.models import SEQ_LEN

HERE = Path(__file__).resolve().parent


def _batches(n=3, size=8):
    return collect_batches(torch.utils.data.DataLoader(TokenDataset(), batch_size=size), n, None)


def test_batches_of_a_tokenizer_collator_are_taken_like_dicts():
    """DataCollatorForSeq2Seq (instruction data in `hf-lowrank train`) yields a BatchEncoding, a mapping but
    no dict: LoRA-GA refused every instruction dataset."""
    from transformers import BatchEncoding

    def encoded(rows):
        return BatchEncoding(torch.utils.data.default_collate(rows))

    loader = torch.utils.data.DataLoader(TokenDataset(), batch_size=8, collate_fn=encoded)
    got, expected = collect_batches(loader, 3, None), _batches(3, 8)
    assert len(got) == 3
    for mine, reference in zip(got, expected, strict=True):
        assert mine.keys() == reference.keys() and all(torch.equal(mine[k], reference[k]) for k in mine)


def _autograd_gradients(model, batches):
    """Reference: mean of per-batch mean-loss gradients by plain autograd on a copy, weights requiring grad."""
    ref = copy.deepcopy(model).train()
    for p in ref.parameters():
        p.requires_grad_(False)
    weights = {n: m.weight for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    for w in weights.values():
        w.requires_grad_(True)
    torch.manual_seed(0)
    for b in batches:
        ref(**b).loss.backward()
    return {n: w.grad / len(batches) for n, w in weights.items()}


def _short(name):
    return name.removeprefix("base_model.model.")


def _official(G, r, s, direction, scale, W):
    """A, B by hand from the exact SVD of G, following the official LoRA-GA code."""
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    if direction == "ArB2r":
        A, B = Vh[:r], U[:, r : 2 * r]
    elif direction == "A2rBr":
        A, B = Vh[r : 2 * r], U[:, :r]
    else:  # ArBr
        A, B = Vh[1 : 2 * r : 2], U[:, 0 : 2 * r : 2]
    if scale == "stable":
        f = G.shape[0] ** 0.25 / 16**0.5
        A, B = A * f, B * f
    elif scale == "gd":
        A, B = A / s, B / s
    elif scale == "weight_svd":
        f = (torch.linalg.svd(W)[1][:r] / s).sqrt().mean()
        A, B = A * f, B * f
    return A, B


def _assert_close_up_to_sign(got, want, rows, atol):
    """Singular vectors are defined up to sign: align each row (or column) before comparing."""
    got, want = (got, want) if rows else (got.t(), want.t())
    signs = torch.sign((got * want).sum(dim=1, keepdim=True))
    assert (got * signs - want).abs().max() <= atol


SCALES = ["stable", "gd", "unit", "weight_svd"]


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
@pytest.mark.integration
def test_init_matches_the_exact_gradient_reference_and_keeps_the_output(batch, direction):
    base = make_tiny_model()
    batches = _batches()
    ref_out = logits(base, batch)
    G = _autograd_gradients(base, batches)
    W0 = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    s = 16 / 4**0.5  # rsLoRA by default, alpha 16
    for scale in SCALES:
        adapted = hlp.attach(
            copy.deepcopy(base),
            "lora_ga",
            r=4,
            estimator="full",
            svd="exact",
            direction=direction,
            scale=scale,
            ga_batches=3,
        )
        assert adapted.begin_training(batches)
        for name, layer in lora_layers(adapted.model).items():
            A_ref, B_ref = _official(G[_short(name)], 4, s, direction, scale, W0[_short(name)])
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            tol = 2e-4 * max(A_ref.abs().max(), B_ref.abs().max())
            _assert_close_up_to_sign(A, A_ref, rows=True, atol=tol)
            _assert_close_up_to_sign(B, B_ref, rows=False, atol=tol)
            assert torch.allclose(layer.base_layer.weight, W0[_short(name)] - s * B @ A, atol=1e-6)
        adapted.model.eval()
        assert rel_err(logits(adapted.model, batch), ref_out) <= 1e-5, scale
        assert all(p.grad is None for p in adapted.model.parameters())
        assert all(p.requires_grad == ("lora_" in n) for n, p in adapted.model.named_parameters())


@pytest.mark.parametrize("direction", ["ArB2r", "ArBr"])
def test_peft_variant_equals_peft_lora_ga_init(batch, direction):
    """variant='peft' reproduces PEFT 0.21's own lora_ga_init given the same gradient (r=16: the randomized
    SVD's q = 4r covers every dimension of the tiny layers, so it is exact)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import LoraGAConfig

    base, batches = make_tiny_model(), _batches()
    ref_out = logits(base, batch)
    G = _autograd_gradients(base, batches)
    for scale in SCALES:
        peft_model = copy.deepcopy(base)
        for n, m in peft_model.named_modules():
            if n in G:
                m._peft_loraga_grad = G[n]
        cfg = LoraConfig(
            r=16,
            lora_alpha=16,
            use_rslora=True,
            target_modules="all-linear",
            init_lora_weights="lora_ga",
            lora_ga_config=LoraGAConfig(direction=direction, scale={"gd": "gd_scale"}.get(scale, scale)),
        )
        peft_model = get_peft_model(peft_model, cfg)
        adapted = hlp.attach(
            copy.deepcopy(base),
            "lora_ga",
            r=16,
            estimator="full",
            svd="exact",
            variant="peft",
            direction=direction,
            scale=scale,
            ga_batches=3,
        )
        adapted.begin_training(batches)
        theirs = dict(peft_model.named_modules())
        for name, layer in lora_layers(adapted.model).items():
            other = theirs[name]
            for ours, ref, rows in (
                (layer.lora_A["default"].weight, other.lora_A["default"].weight, True),
                (layer.lora_B["default"].weight, other.lora_B["default"].weight, False),
            ):
                _assert_close_up_to_sign(ours, ref, rows=rows, atol=5e-3 * ref.abs().max())  # PEFT: randomized SVD
        # W_res depends on the SVD's sign choices (B@A), so compare what is invariant: the output
        adapted.model.eval()
        assert rel_err(logits(adapted.model, batch), ref_out) <= 1e-5, scale


@pytest.mark.parametrize("n_batches, size", [(3, 8), (2, 1)])  # the sums as G; the MLP's as kept factors
@pytest.mark.integration
def test_streaming_estimate_equals_plain_autograd_and_groups_change_nothing(n_batches, size):
    """The layer-group count trades passes for memory and nothing else: the factors are bit for bit the same
    (so sizing it from the memory in use, which differs run to run, never changes a result)."""
    base, batches = make_tiny_model(), _batches(n_batches, size)
    G = _autograd_gradients(base, batches)
    got = {}
    for groups in (1, 3):
        adapted = hlp.attach(copy.deepcopy(base), "lora_ga", r=4, estimator="full", svd="exact", ga_layer_groups=groups)
        got[groups] = estimate_gradient_factors(adapted.model, adapted.config, batches)
    for name, f in got[1].items():
        U, S, Vh = torch.linalg.svd(G[_short(name)], full_matrices=False)
        assert float((f.S - S[:8]).abs().max() / S[0]) <= 1e-5  # singular values of the exact G
        assert float((f.Vh @ Vh[:8].t()).pow(2).sum()) / 8 >= 1 - 1e-5  # same top-2r subspaces
        assert float((f.U.t() @ U[:, :8]).pow(2).sum()) / 8 >= 1 - 1e-5
        assert all(torch.equal(a, b) for a, b in zip(vars(got[3][name]).values(), vars(f).values(), strict=True))


def _assumed_inputs(layers):
    from hf_lowrank_lora_ga import gradient, grouping

    return {
        n: grouping.LayerInput.assumed(*gradient.layer_dims(layer), i) for i, (n, layer) in enumerate(layers.items())
    }


@pytest.mark.parametrize("share_of_targets, groups", [(1.0, 1), (0.5, 2), (0.3, 4), (0.0, None)])
def test_default_layer_groups_are_the_fewest_whose_sums_fit_a_tenth_of_the_memory_in_use(share_of_targets, groups):
    """Unset ``ga_layer_groups``: the fewest groups whose largest one's sums add at most 10% of the memory in
    use to a pass (here the sums are fp32 G, and the memory in use is the targets' fp32 bytes times
    ``share_of_targets`` / 0.1); 0 (no reading): one layer a pass."""
    from hf_lowrank_lora_ga import gradient, grouping

    layers = lora_layers(hlp.attach(make_tiny_model(), "lora_ga", r=4).model)
    inputs = _assumed_inputs(layers)
    targets = sum(4 * m * n for m, n in map(gradient.layer_dims, layers.values()))
    budget = targets * share_of_targets
    memory = grouping.PassMemory(int(budget / grouping.ACCUMULATOR_SHARE), None, None)
    count = grouping.layer_group_count(inputs, memory)
    assert count == (groups or len(layers))

    def largest(n):
        return max(memory.peak_bytes(group, inputs) for group in grouping.layer_groups(inputs, None, n))

    assert largest(count) <= budget or not groups
    if count > 1:  # and one group fewer would not fit
        assert largest(count - 1) > budget


def test_sums_count_a_shared_input_once_and_the_earlier_batches_at_the_peak():
    """What the sums hold: the factors (fp32 G once larger, :class:`FullAccumulator`'s switch), an input
    that several layers of a group read counted once; what they add to a pass's peak: the sums of every
    batch but the last."""
    from hf_lowrank_lora_ga import grouping
    from hf_lowrank_lora_ga.grouping import LayerInput, PassMemory, accumulator_bytes, held_bytes

    q, k = LayerInput(64, 32, 1, 4 * 32, 4 * 64), LayerInput(16, 32, 1, 4 * 32, 4 * 16)
    down = LayerInput(32, 128, 2, 2 * 128, 2 * 32)  # bf16 rows
    inputs = {"q": q, "k": k, "down": down}
    assert held_bytes(["q", "k"], inputs, 3) == 3 * 4 * (64 + 16) + 3 * 4 * 32  # x once
    assert held_bytes(["q"], inputs, 3) + held_bytes(["k"], inputs, 3) == held_bytes(["q", "k"], inputs, 3) + 3 * 4 * 32
    assert held_bytes(["k"], inputs, 10) == 10 * 4 * (16 + 32)  # 10 x 48 entries < 16 x 32: factors
    assert held_bytes(["k"], inputs, 11) == 4 * 16 * 32  # 11 x 48 entries >= 16 x 32: G
    assert held_bytes(["down"], inputs, 5) == 5 * 2 * (128 + 32) and held_bytes(["down"], inputs, None) == 4 * 32 * 128
    assert [accumulator_bytes(64, 32, rows) for rows in (3, 30, None)] == [4 * 3 * 96, 4 * 64 * 32, 4 * 64 * 32]
    group = ["q", "k", "down"]
    assert PassMemory(10**6, 3, 6).peak_bytes(group, inputs) == held_bytes(group, inputs, 3)
    assert PassMemory(10**6, 0, 3).peak_bytes(["q"], inputs) == 0  # one batch: nothing kept before it
    assert PassMemory(10**6, 11, 22).peak_bytes(["k"], inputs) == 4 * 16 * 32  # G by then
    assert (
        grouping.batch_rows(_batches(2, 3)) == 2 * 3 * SEQ_LEN and grouping.batch_rows([{"x": torch.ones(3)}]) is None
    )


def test_default_sizing_reads_the_first_forward_and_changes_nothing_but_the_passes(monkeypatch):
    """Unset ``ga_layer_groups``: the first pass records what every layer's sum will hold (q/k/v and
    gate/up each share their input) and the memory in use after its first forward, then goes on with
    the first group only; each budget gives its count of passes, and the factors are bit for bit those
    of one pinned group."""
    from hf_lowrank_lora_ga import gradient, grouping

    base, batches = make_tiny_model(), _batches(2, 1)
    pinned = hlp.attach(copy.deepcopy(base), "lora_ga", r=4, estimator="full", svd="exact", ga_layer_groups=1)
    expected = estimate_gradient_factors(pinned.model, pinned.config, batches)
    adapted = hlp.attach(copy.deepcopy(base), "lora_ga", r=4, estimator="full", svd="exact")
    layers = lora_layers(adapted.model)
    recorded: list[dict] = []
    passes: list[int] = []
    folded: list[int] = []
    original_count, original_pass = gradient.layer_group_count, gradient._run_pass
    monkeypatch.setattr(
        gradient, "layer_group_count", lambda inputs, memory: recorded.append(inputs) or original_count(inputs, memory)
    )

    def counting_pass(model, layers, taps, *args, **kwargs):
        passes.append(len(taps.accumulators))
        original_pass(model, layers, taps, *args, **kwargs)
        folded.append(len(taps.accumulators))  # the first pass keeps folding its first group only
        assert all(kept.x is None for name in taps.kept for kept in taps.kept[name])  # no input left behind

    monkeypatch.setattr(gradient, "_run_pass", counting_pass)
    rows, rows_before_last = grouping.batch_rows(batches), grouping.batch_rows(batches[:-1])

    def estimate(in_use):
        readings = iter([in_use])  # read once, after the first forward
        monkeypatch.setattr(gradient, "in_use_bytes", lambda device, tensors=(): next(readings))
        passes.clear()
        got = estimate_gradient_factors(adapted.model, adapted.config, batches)
        assert all(
            torch.equal(a, b)
            for n in expected
            for a, b in zip(vars(got[n]).values(), vars(expected[n]).values(), strict=True)
        )
        assert passes[0] == len(layers)  # the first pass starts with every layer
        return len(passes)

    no_reading = estimate(0)
    inputs = recorded[-1]
    assert no_reading == len(grouping.layer_groups(inputs, rows, len(layers))) > 1  # as many groups as layers
    total = grouping.held_bytes(list(inputs), inputs, rows)
    assert total < sum(4 * m * n for m, n in map(gradient.layer_dims, layers.values()))  # 2 x 16 tokens: factors
    for share in (1.0, 0.4):
        in_use = int(share * total / grouping.ACCUMULATOR_SHARE)
        count = original_count(inputs, grouping.PassMemory(in_use, rows_before_last, rows))
        assert estimate(in_use) == count and (count == 1) == (share == 1.0)
        assert folded[-count:] == [len(group) for group in grouping.layer_groups(inputs, rows, count)]
    first = [n for n in inputs if ".layers.0." in n]
    keys = {n.rsplit(".", 1)[-1]: inputs[n].input_key for n in first}
    assert keys["q_proj"] == keys["k_proj"] == keys["v_proj"] != keys["o_proj"]
    assert keys["gate_proj"] == keys["up_proj"] != keys["down_proj"]
    assert all(inputs[n].input_row_bytes == 4 * layers[n].in_features for n in first)


def test_compacted_factors_share_one_aligned_buffer_and_sum_bit_for_bit():
    """``compact_factors`` moves the pairs kept since its last call into one buffer: an input that two sums
    share is copied once, every copy starts 64-byte aligned, G is the plain sum bit for bit, and a kept
    tensor changed in place before the move is refused as before."""
    from hf_lowrank_lora_ga.accumulators import FullAccumulator, compact_factors

    gen = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    q, k = FullAccumulator(24, 32, cpu), FullAccumulator(16, 32, cpu)  # 9 rows stay factors in both
    plain = {id(q): torch.zeros(24, 32), id(k): torch.zeros(16, 32)}
    for batch in range(3):
        x = torch.randn(3, 32, generator=gen)  # one input read by both layers
        for acc in (q, k):
            g = torch.randn(3, acc.m, generator=gen)
            acc.fold(x, g)
            plain[id(acc)].addmm_(g.t(), x)
        if batch < 2:  # x: 384 bytes; q's g: 288 -> 320 aligned; k's g: 192
            assert compact_factors([q, k], cpu) == 384 + 320 + 192
    first, second = q.factors[0], q.factors[1]
    storage = first[0].untyped_storage().data_ptr()
    assert first[0].data_ptr() == k.factors[0][0].data_ptr()  # the shared input copied once
    assert first[1].untyped_storage().data_ptr() == storage != second[0].untyped_storage().data_ptr()
    assert all(t.data_ptr() % 64 == 0 for acc in (q, k) for pair in acc.factors[:2] for t in pair[:2])
    assert q.factors[2][0].untyped_storage().data_ptr() != storage  # the last batch's stay where they are
    assert torch.equal(q.dense(), plain[id(q)]) and torch.equal(k.dense(), plain[id(k)])
    changed = FullAccumulator(24, 32, cpu)
    x = torch.randn(3, 32, generator=gen)
    changed.fold(x, torch.randn(3, 24, generator=gen))
    x.mul_(2)
    with pytest.raises(hlp.LowRankError, match="in place"):
        compact_factors([changed], cpu)


@pytest.mark.parametrize("reentrant", [False, True])
def test_estimate_under_gradient_checkpointing_equals_the_plain_one(reentrant):
    """With the model's gradient checkpointing on (each decoder layer's forward run again in backward), the
    default estimate gives the factors of a plain pass bit for bit: a recomputed call's kept input is
    dropped with its output (non-reentrant), or the recomputation is the call that folds (reentrant)."""
    base, batches = make_tiny_model(), _batches(2, 1)
    plain = hlp.attach(copy.deepcopy(base), "lora_ga", r=4, estimator="full", svd="exact", ga_layer_groups=1)
    expected = estimate_gradient_factors(plain.model, plain.config, batches)
    adapted = hlp.attach(copy.deepcopy(base), "lora_ga", r=4, estimator="full", svd="exact")
    adapted.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    got = estimate_gradient_factors(adapted.model, adapted.config, batches)
    assert got.keys() == expected.keys()
    for name, factors in got.items():
        assert all(
            torch.equal(a, b) for a, b in zip(vars(factors).values(), vars(expected[name]).values(), strict=True)
        )


@pytest.mark.parametrize("rows_per_batch", [3, 40])
def test_accumulator_keeps_factors_while_smaller_and_sums_bit_for_bit_like_dense(rows_per_batch):
    """A 24 x 32 layer: 3 rows a batch stay as factors (3 x 56 entries < 768) until they outgrow G,
    40 rows go to G at once; either way G is the same ``addmm_`` sequence as a plain fp32 sum."""
    from hf_lowrank_lora_ga.accumulators import FullAccumulator

    gen = torch.Generator().manual_seed(0)
    pairs = [
        (torch.randn(rows_per_batch, 32, generator=gen), torch.randn(rows_per_batch, 24, generator=gen))
        for _ in range(6)
    ]
    acc, plain = FullAccumulator(24, 32, torch.device("cpu")), torch.zeros(24, 32)
    for i, (x, g) in enumerate(pairs):
        acc.fold(x, g)
        plain.addmm_(g.t(), x)
        factored = (i + 1) * rows_per_batch * (24 + 32) < 24 * 32
        assert (acc._G is None) == factored and len(acc.factors) == (i + 1 if factored else 0)
    assert torch.equal(acc.dense(), plain)
    kept = FullAccumulator(24, 32, torch.device("cpu"))
    x, g = pairs[0]
    kept.fold(x[:3].clone(), g[:3])
    kept.factors[0][0].mul_(2)  # a model that rewrites an activation in place after its layer ran
    with pytest.raises(hlp.LowRankError, match="in place"):
        kept.dense()


def test_plan_counts_the_sums_the_estimate_holds():
    """``hf-lowrank plan``: with one layer group the term is twice the sums after ga_batches x batch x
    sequence tokens (the factors while smaller than G), so fewer or shorter batches plan less."""
    from hf_lowrank_lora_ga.grouping import accumulator_bytes
    from hf_lowrank_plugins.plan import plan_memory
    from hf_lowrank_plugins.testing.helpers import tiny_llama_config
    from hf_lowrank_plugins.types import PlanSettings

    config = tiny_llama_config()
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 2  # q k v o gate up down
    terms = {}
    for batches, seq_len in ((1, 8), (8, 64)):
        settings = PlanSettings(batch_size=2, seq_len=seq_len, dtype=torch.float32)
        plan = plan_memory(config, "lora_ga", settings, r=4, ga_batches=batches, ga_layer_groups=1)
        terms[batches] = plan.terms["lora_ga_init"]
        assert terms[batches] == 2 * sum(accumulator_bytes(m, n, batches * 2 * seq_len) for m, n in shapes)
    assert terms[1] < terms[8] == 2 * sum(4 * m * n for m, n in shapes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zero3_gathered", [False, True])
def test_subtract_factors_keeps_the_parameter_and_rounds_once(dtype, zero3_gathered):
    """W - s*B@A in fp32, rounded once to W's dtype; the Parameter object stays. On a CPU the weight gets a
    new tensor (the old, often memory-mapped, pages are handed back); ZeRO-3's gathered weights
    (``ds_id``) are written in place, since DeepSpeed partitions the storage they hold."""
    from hf_lowrank_lora.resume import subtract_factors

    adapted = hlp.attach(make_tiny_model().to(dtype), "lora_ga", r=4)
    layer = next(iter(lora_layers(adapted.model).values()))
    weight = layer.get_base_layer().weight
    if zero3_gathered:
        weight.ds_id = 0
    before, address = weight.detach().clone(), weight.data_ptr()
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, weight.shape[1], generator=gen), torch.randn(weight.shape[0], 4, generator=gen)
    subtract_factors(layer, A, B, 0.5)
    assert layer.get_base_layer().weight is weight
    assert (weight.data_ptr() == address) == zero3_gathered
    assert torch.equal(weight.detach(), (before.float() - (B @ A).mul_(0.5)).to(dtype))


@pytest.mark.integration
def test_sketch_is_exact_at_full_rank_and_seeded():
    """With k >= min(m, n) the two-sided sketch determines G exactly (the algebra); smaller k is an
    approximation whose quality on a real model is measured in benchmarks/bench_init.py."""
    base, batches = make_tiny_model(), _batches()
    G = _autograd_gradients(base, batches)
    adapted = hlp.attach(copy.deepcopy(base), "lora_ga", r=4, estimator="sketch", sketch_rank=64)
    got = estimate_gradient_factors(adapted.model, adapted.config, batches)
    for name, f in got.items():
        U, S, Vh = torch.linalg.svd(G[_short(name)], full_matrices=False)
        assert float((f.S - S[:8]).abs().max() / S[0]) <= 1e-4
        assert float((f.Vh @ Vh[:8].t()).pow(2).sum()) / 8 >= 1 - 1e-4
    again = estimate_gradient_factors(adapted.model, adapted.config, batches)
    # seeded test matrices: a second estimate gives the same factors (up to BLAS rounding)
    for n, f in got.items():
        assert torch.allclose(again[n].S, f.S, rtol=1e-5)
        assert float((again[n].Vh @ f.Vh.t()).pow(2).sum()) / 8 >= 1 - 1e-5


class _AfterInit(TrainerCallback):
    """Placed after adapted.callback: sees the model right after the data-dependent init."""

    def __init__(self, adapted, batch):
        self.adapted, self.batch, self.logits = adapted, batch, None

    def on_train_begin(self, args, state, control, **kwargs):
        model = self.adapted.model
        was = model.training
        model.eval()
        self.logits = logits(model, self.batch)
        model.train(was)


@pytest.mark.integration
def test_trains_through_a_plain_trainer_and_starts_at_the_base(tmp_path, batch):
    base = make_tiny_model()
    ref = logits(base, batch)
    adapted = hlp.attach(base, "lora_ga", r=4, ga_batches=2)
    trainer = Trainer(
        model=adapted.model,
        args=training_args(tmp_path, learning_rate=1e-3),
        train_dataset=TokenDataset(),
        **adapted.trainer_kwargs(),
    )
    probe = _AfterInit(adapted, batch)
    trainer.add_callback(probe)
    trainer.train()
    assert rel_err(probe.logits, ref) <= 1e-5  # identity at step 0, after the gradient init
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0] - 0.05
    assert not any(h for m in adapted.model.modules() for h in (m._forward_hooks, m._forward_pre_hooks))


def _run(tmp_path, name, resume=None, targets=None, **kw):
    adapted = hlp.attach(
        make_tiny_model(), "lora_ga", r=4, ga_batches=2, **({"target_modules": targets} if targets else {})
    )
    args = training_args(
        tmp_path / name,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=4,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        **kw,
    )
    trainer = Trainer(model=adapted.model, args=args, train_dataset=TokenDataset(), **adapted.trainer_kwargs())
    trainer.train(resume_from_checkpoint=resume)
    return trainer, adapted


@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj", "lm_head"]], ids=["default", "with-lm_head"])
@pytest.mark.integration
def test_resume_does_not_rerun_the_init_and_reproduces_the_run(tmp_path, monkeypatch, batch, targets):
    """With lm_head targeted the checkpoint holds its base weight, W_res already: it was rebased a second time
    (W - 2 s B0 A0) and the resumed run diverged."""
    calls = []
    real = ga_plugin.estimate_gradient_factors
    monkeypatch.setattr(ga_plugin, "estimate_gradient_factors", lambda *a, **k: calls.append(1) or real(*a, **k))
    full, full_adapted = _run(tmp_path, "full", targets=targets)
    assert calls == [1]
    resumed, resumed_adapted = _run(tmp_path, "full", resume=str(tmp_path / "full" / "checkpoint-8"), targets=targets)
    assert calls == [1]  # the checkpoint's A0, B0 rebuilt W_res; no second estimate
    before = [e["loss"] for e in full.state.log_history if "loss" in e]
    after = [e["loss"] for e in resumed.state.log_history if "loss" in e]
    assert len(after) == len(before) == 12
    assert after[-4:] == pytest.approx(before[-4:], abs=1e-5)
    for m in (full_adapted.model, resumed_adapted.model):
        m.eval()
    assert rel_err(logits(resumed_adapted.model, batch), logits(full_adapted.model, batch)) <= 1e-5


@pytest.mark.parametrize(
    "settings",
    [
        {"target_modules": ["q_proj", "lm_head"]},
        {"target_modules": ["q_proj", "embed_tokens"]},
    ],
    ids=["lm_head", "embedding"],
)
@pytest.mark.integration
def test_the_exported_adapter_reloads_in_plain_peft_off_the_usual_targets(tmp_path, batch, settings):
    """A targeted head's saved base weight (W_res) loaded under the rank-2r adapter, an embedding's rank-r
    factors did not fit the rank-2r config."""
    base_dir = tmp_path / "base"
    make_tiny_model().save_pretrained(base_dir)
    adapted = hlp.attach(AutoModelForCausalLM.from_pretrained(base_dir), "lora_ga", r=4, ga_batches=2, **settings)
    args = training_args(tmp_path / "run", max_steps=2, learning_rate=1e-3)
    Trainer(model=adapted.model, args=args, train_dataset=TokenDataset(), **adapted.trainer_kwargs()).train()
    adapted.model.eval()
    trained = logits(adapted.model, batch)
    result = adapted.export(tmp_path / "out")
    plain, _ = plain_peft_logits(base_dir, result.adapter_dir, batch, tmp_path)
    assert rel_err(plain, trained) <= 1e-5


def test_a_target_tied_to_another_module_is_refused():
    """W_res = W - s B0 A0 would change the embedding the head shares too."""
    with pytest.raises(hlp.IncompatibleError, match="'lm_head', which 'model.embed_tokens' shares"):
        hlp.attach(make_tiny_model(tie_word_embeddings=True), "lora_ga", r=2, target_modules=["q_proj", "lm_head"])


@pytest.mark.integration
def test_portable_export_merged_checkpoint_and_config_round_trip(tmp_path, batch):
    base_dir = tmp_path / "base"
    make_tiny_model().save_pretrained(base_dir)
    adapted = hlp.attach(
        AutoModelForCausalLM.from_pretrained(base_dir), "lora_ga", r=4, ga_batches=2, direction="A2rBr", scale="unit"
    )
    Trainer(
        model=adapted.model,
        args=training_args(tmp_path / "run", learning_rate=1e-3),
        train_dataset=TokenDataset(),
        **adapted.trainer_kwargs(),
    ).train()
    adapted.model.eval()
    trained = logits(adapted.model, batch)
    result = adapted.export(tmp_path / "out", merge=True)
    cfg = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True and "hf_lowrank_method" not in cfg
    assert json.loads((result.adapter_dir / "hf_lowrank_method.json").read_text())["method"] == "lora"
    from safetensors.torch import load_file

    assert not any("lora_ga" in k for k in load_file(result.adapter_dir / "adapter_model.safetensors"))
    plain, config_class = plain_peft_logits(base_dir, result.adapter_dir, batch, tmp_path)
    assert config_class == "LoraConfig"
    assert rel_err(plain, trained) <= 1e-5
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert (logits(merged, batch) - trained).abs().max() <= 1e-4
    adapted.model.save_pretrained(tmp_path / "ckpt")  # what the Trainer's checkpoints hold
    loaded = hlp.load_config(tmp_path / "ckpt")
    assert type(loaded).__name__ == "LoraGaConfig"
    for field in ("direction", "scale", "ga_batches", "estimator", "stable_gamma", "use_rslora", "lora_alpha"):
        assert getattr(loaded, field) == getattr(adapted.config, field)


def test_config_defaults_and_errors():
    cfg = hlp.make_config("lora_ga", r=8)
    assert (cfg.direction, cfg.scale, cfg.stable_gamma, cfg.use_rslora, cfg.lora_alpha) == (
        "ArB2r",
        "stable",
        16,
        True,
        16,
    )
    assert cfg.init_lora_weights is True and (cfg.estimator, cfg.ga_layer_groups) == ("full", None)
    for bad, match in [
        ({"direction": "BrAr"}, "direction must be one of"),
        ({"scale": "big"}, "scale must be one of"),
        ({"estimator": "x"}, "estimator must be"),
        ({"ga_batches": 0}, "ga_batches must be >= 1"),
        ({"ga_layer_groups": 0}, "ga_layer_groups must be >= 1"),
        ({"sketch_rank": 4}, "below 2r"),
        ({"use_dora": True}, "use_dora"),
    ]:
        with pytest.raises(hlp.ConfigError, match=match):
            hlp.make_config("lora_ga", r=4, **bad)
    with pytest.raises(hlp.ConfigError, match=r"2r <= min\(out, in\)"):
        hlp.attach(make_tiny_model(), "lora_ga", r=17)  # k_proj is 32 x 64: 2r = 34 > 32


def test_runtime_errors_name_the_fix(tmp_path):
    adapted = hlp.attach(make_tiny_model(), "lora_ga", r=4)
    empty = torch.utils.data.DataLoader(TokenDataset(n=0), batch_size=4)
    with pytest.raises(hlp.LowRankError, match="no batches"):
        adapted.begin_training(empty)
    no_labels = [{"input_ids": TokenDataset().x[:4]}]
    with pytest.raises(hlp.LowRankError, match="must carry labels"):
        adapted.begin_training(no_labels)
    assert all(not h for m in adapted.model.modules() for h in (m._forward_hooks, m._forward_pre_hooks))
    assert all(p.requires_grad == ("lora_" in n) for n, p in adapted.model.named_parameters())
    too_big = hlp.attach(make_tiny_model(), "lora_ga", r=4, ga_batch_size=16)
    with pytest.raises(hlp.ConfigError, match="ga_batch_size 16 exceeds"):
        too_big.begin_training(torch.utils.data.DataLoader(TokenDataset(), batch_size=8))


@pytest.mark.ddp
@pytest.mark.parametrize("estimator, base", [("sketch", "full"), ("full", "full"), ("full", "4bit")])
@pytest.mark.integration
def test_two_process_ddp_ranks_initialise_identically(tmp_path, estimator, base):
    """On a 4-bit base (QLoRA-GA) every rank holds rank 0's packed residual, codes and scales."""
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            *TORCHRUN_TWO_PROCESSES,
            str(HERE / "ddp_train_lora_ga.py"),
            str(tmp_path),
            estimator,
            base,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["world_size"] == 2 and result["init_norm"] > 0
    assert result["init_difference"] == 0.0  # all-reduced statistics: the same A0, B0 and W_res on both ranks
    assert result["trained_difference"] == 0.0


@pytest.mark.integration
def test_qlora_ga_estimates_on_the_dequantized_weights_and_quantizes_the_residual(batch):
    """QLoRA-GA: A, B are full-precision LoRA-GA's on deq(NF4(W)) (the 4-bit forward is that model's), and
    each base holds NF4(deq(NF4(W)) - s*B@A) exactly; the adapted model is that base plus s*B@A."""
    from hf_lowrank_plugins.quantization import (
        dequantize_model,
        dequantized_4bit_weight,
        quantize_model,
        roundtrip_4bit,
    )

    settings = {"r": 4, "estimator": "full", "svd": "exact", "ga_batches": 3}
    batches = _batches()
    qlora_ga = hlp.attach(make_tiny_model(), "lora_ga", load_in_4bit=True, **settings)
    quantization = hlp.QuantizationSettings.from_config(qlora_ga.config)
    nf4 = {n: dequantized_4bit_weight(layer.get_base_layer()) for n, layer in lora_layers(qlora_ga.model).items()}
    on_dequantized = hlp.attach(
        dequantize_model(quantize_model(make_tiny_model(), quantization)), "lora_ga", **settings
    )
    assert qlora_ga.begin_training(batches) and on_dequantized.begin_training(batches)
    reference = lora_layers(on_dequantized.model)
    for name, layer in lora_layers(qlora_ga.model).items():
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        A_ref, B_ref = reference[name].lora_A["default"].weight, reference[name].lora_B["default"].weight
        tol = 1e-4 * max(A_ref.abs().max(), B_ref.abs().max())
        _assert_close_up_to_sign(A, A_ref, rows=True, atol=tol)
        _assert_close_up_to_sign(B, B_ref, rows=False, atol=tol)
        residual = nf4[name].float() - (B.float() @ A.float()).mul_(layer.scaling["default"])
        assert torch.equal(dequantized_4bit_weight(layer.get_base_layer()), roundtrip_4bit(residual, quantization))
    qlora_ga.model.eval()
    with_residual = dequantize_model(copy.deepcopy(qlora_ga.model))  # PEFT's merge of deq(base) + s*B@A
    assert rel_err(logits(qlora_ga.model, batch), logits(with_residual.merge_and_unload(), batch)) <= 1e-5
