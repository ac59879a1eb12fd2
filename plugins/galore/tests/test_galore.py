"""GaLore plugin: exactness against galore-torch 1.0, Trainer integration, resume, 8-bit, layer-wise, export."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

from hf_lowrank_plugins import ConfigError, IncompatibleError, attach
from hf_lowrank_plugins.testing.helpers import TokenDataset, logits, make_tiny_model, training_args

galore = pytest.importorskip("hf_lowrank_galore")
from hf_lowrank_galore.adafactor import GaLoreAdafactor  # noqa: E402
from hf_lowrank_galore.optimizer import GaLoreAdamW  # noqa: E402
from hf_lowrank_galore.projector import low_rank_shape, projection_side  # noqa: E402

PROJ_TYPES = ["std", "reverse_std", "right", "left", "full"]


def _unwrap(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    while not isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _losses(trainer: Trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _train(tmp_path, name="run", seed=0, attach_kw=None, resume=None, dtype=None, **arg_kw):
    model = make_tiny_model(seed) if dtype is None else make_tiny_model(seed).to(dtype)
    adapted = attach(model, "galore", **{"rank": 4, "update_proj_gap": 5, **(attach_kw or {})})
    args = training_args(tmp_path / name, **arg_kw)
    trainer = Trainer(model=adapted.model, args=args, train_dataset=TokenDataset(), **adapted.trainer_kwargs())
    trainer.train(resume_from_checkpoint=resume)
    return adapted, trainer


# ---------------------------------------------------------------- exactness vs galore-torch


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_matches_galore_torch(proj_type):
    """Same gradients -> same weights as galore_torch.GaLoreAdamW, across two projector refreshes."""
    reference = pytest.importorskip("galore_torch")
    g = torch.Generator().manual_seed(0)
    shapes = [(48, 24), (24, 48)]  # tall (right projection under std) and wide (left)
    ours_w = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ref_w = [torch.nn.Parameter(w.detach().clone()) for w in ours_w]
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    gal = dict(rank=4, update_proj_gap=3, scale=0.25, proj_type=proj_type)
    ours = GaLoreAdamW([{"params": ours_w, "galore": True, **gal}], **hyper)
    ref = reference.GaLoreAdamW([{"params": ref_w, **gal}], no_deprecation_warning=True, **hyper)
    for _ in range(8):  # refreshes at steps 0, 3, 6
        grads = [torch.randn(s, generator=g) for s in shapes]
        for w, gr in zip(ours_w, grads, strict=False):
            w.grad = gr.clone()
        for w, gr in zip(ref_w, grads, strict=False):
            w.grad = gr.clone()
        ours.step()
        ref.step()
    for a, b in zip(ours_w, ref_w, strict=False):
        assert (a - b).abs().max().item() <= 1e-6
    for w in ours_w:  # moments are low-rank sized
        side = projection_side(w.shape, proj_type)
        assert tuple(ours.state[w]["exp_avg"].shape) == low_rank_shape(w.shape, 4, side)


ADAFACTOR_SETTINGS = {
    "manual lr, no first moment": dict(lr=1e-2, scale_parameter=False, relative_step=False, weight_decay=0.1),
    "manual lr, beta1": dict(lr=1e-2, beta1=0.9, scale_parameter=False, relative_step=False),
    "relative step, parameter scale": dict(lr=None, scale_parameter=True, relative_step=True, warmup_init=True),
}


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("setting", list(ADAFACTOR_SETTINGS))
def test_adafactor_matches_galore_torch(proj_type, setting):
    """Same gradients -> same weights as galore_torch.GaLoreAdafactor; untargeted tensors as transformers' Adafactor."""
    reference = pytest.importorskip("galore_torch")
    from transformers.optimization import Adafactor

    hyper = ADAFACTOR_SETTINGS[setting]
    g = torch.Generator().manual_seed(0)
    shapes = [(48, 24), (24, 48)]
    ours_w = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ref_w = [torch.nn.Parameter(w.detach().clone()) for w in ours_w]
    ours_plain = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(48, 24), (24,)]]  # matrix + bias
    ref_plain = [torch.nn.Parameter(w.detach().clone()) for w in ours_plain]
    gal = dict(rank=4, update_proj_gap=3, scale=0.25, proj_type=proj_type)
    ours = GaLoreAdafactor([{"params": ours_w, "galore": True, **gal}, {"params": ours_plain}], **hyper)
    ref = reference.GaLoreAdafactor([{"params": ref_w, **gal}], **hyper)
    ref_plain_opt = Adafactor(ref_plain, **hyper)
    for _ in range(8):  # refreshes at steps 0, 3, 6
        for ws_a, ws_b in ((ours_w, ref_w), (ours_plain, ref_plain)):
            for a, b in zip(ws_a, ws_b, strict=False):
                a.grad = torch.randn(a.shape, generator=g)
                b.grad = a.grad.clone()
        ours.step()
        ref.step()
        ref_plain_opt.step()
    for a, b in zip(ours_w + ours_plain, ref_w + ref_plain, strict=False):
        assert (a - b).abs().max().item() <= 1e-6
    for w in ours_w:  # factored second moment of the low-rank gradient: rows + columns of an r-sized matrix
        m, n = low_rank_shape(w.shape, 4, projection_side(w.shape, proj_type))
        assert ours.state[w]["exp_avg_sq_row"].numel() + ours.state[w]["exp_avg_sq_col"].numel() == m + n


def test_state_dict_round_trip_8bit():
    """8-bit moments keep uint8/float32 through state_dict -> load_state_dict; next steps identical."""
    pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 32, generator=g, dtype=torch.bfloat16)
    grads = [torch.randn(64, 32, generator=g, dtype=torch.bfloat16) for _ in range(4)]

    def make(w):
        p = torch.nn.Parameter(w.clone())
        return p, GaLoreAdamW(
            [{"params": [p], "galore": True, "rank": 16, "update_proj_gap": 2}], lr=1e-2, optim_bits=8, min_8bit_size=64
        )

    p1, o1 = make(w0)
    for gr in grads[:2]:
        p1.grad = gr.clone()
        o1.step()
    p2, o2 = make(p1.detach())
    o2.load_state_dict(o1.state_dict())
    assert o2.state[p2]["state1"].dtype == torch.uint8 and o2.state[p2]["absmax1"].dtype == torch.float32
    for gr in grads[2:]:
        p1.grad, p2.grad = gr.clone(), gr.clone()
        o1.step()
        o2.step()
    assert torch.equal(p1, p2)


# ---------------------------------------------------------------- Trainer integration


def test_trainer_trains_with_low_rank_state(tmp_path):
    """Loss goes down; target moments are low-rank; grad_norm logged; hyperparameters taken over."""
    adapted, trainer = _train(tmp_path, weight_decay=0.01, adam_beta2=0.95, adam_epsilon=1e-7)
    losses = list(_losses(trainer).values())
    assert losses[-1] < losses[0] * 0.8
    assert all(
        math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in trainer.state.log_history if "grad_norm" in h
    )
    opt = _unwrap(trainer.optimizer)
    assert isinstance(opt, GaLoreAdamW)
    targets = [
        m.weight for n, m in adapted.model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    ]
    assert len(targets) == 14
    galore_params = {id(p) for g in opt.param_groups if g["galore"] for p in g["params"]}
    assert galore_params == {id(p) for p in targets}
    for w in targets:
        side = projection_side(w.shape, "std")
        assert tuple(opt.state[w]["exp_avg"].shape) == low_rank_shape(w.shape, 4, side)
    for g in opt.param_groups:
        assert g["betas"] == (0.9, 0.95) and g["eps"] == 1e-7
        assert g["weight_decay"] in (0.0, 0.01)
        assert g["lr"] == trainer.lr_scheduler.get_last_lr()[0]  # the Trainer's schedule drives our groups


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
@pytest.mark.integration
def test_resume_gives_same_losses(tmp_path, optimizer):
    """Resume from the middle checkpoint = uninterrupted run; optimizer.pt loads with weights_only."""
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    kw = dict(
        attach_kw={"update_proj_gap": 3, "optimizer": optimizer, "min_8bit_size": 256},
        max_steps=10,
        save_strategy="steps",
        save_steps=5,
    )
    _, full = _train(tmp_path, "full", **kw)
    ckpt = tmp_path / "full" / "checkpoint-5"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert any("proj" in s for s in state["state"].values())
    _, resumed = _train(tmp_path, "resumed", resume=str(ckpt), **kw)
    a, b = _losses(full), _losses(resumed)
    assert set(range(6, 11)) <= set(b)
    for step in range(6, 11):
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-weights"])
@pytest.mark.integration
def test_adafactor_through_trainer_resumes_exactly(tmp_path, dtype):
    """optimizer='adafactor' with optim='adafactor': the Trainer's Adafactor settings are kept, loss
    falls, and resuming from the middle checkpoint reproduces the uninterrupted run; with bf16 weights
    too, whose projector and moments are fp32 and must load as fp32 (torch casts state to the weight's
    dtype: the resumed step failed on a bf16 projector, or drifted after a refresh)."""
    kw = dict(
        dtype=dtype,
        attach_kw={"update_proj_gap": 3, "optimizer": "adafactor"},
        max_steps=10,
        save_strategy="steps",
        save_steps=5,
        optim="adafactor",
        learning_rate=1e-2,
        weight_decay=0.01,
    )
    _, full = _train(tmp_path, "full", **kw)
    opt = _unwrap(full.optimizer)
    assert isinstance(opt, GaLoreAdafactor)
    assert all(g["relative_step"] is False and g["scale_parameter"] is False for g in opt.param_groups)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.01}
    losses = list(_losses(full).values())
    assert losses[-1] < losses[0] * 0.8
    ckpt = tmp_path / "full" / "checkpoint-5"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"].values()
    assert {s["proj"].dtype for s in saved if "proj" in s} == {torch.float32}
    _, resumed = _train(tmp_path, "resumed", resume=str(ckpt), **kw)
    a, b = _losses(full), _losses(resumed)
    for step in range(6, 11):
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])


@pytest.mark.integration
def test_layerwise_matches_and_accumulates(tmp_path):
    """Layer-wise (GA=1) equals the global optimizer (AdamW and Adafactor); with GA=2 it trains and target grads are freed."""
    seen = []

    class NoTargetGrads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            seen.append(
                all(
                    m.weight.grad is None
                    for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and "lm_head" not in n
                )
            )

    common = dict(max_steps=6, max_grad_norm=0.0)
    # bf16 weights: Adafactor projects in fp32, in the hooks as in step() (the hooks projected in bf16 and
    # the first step failed on the dtype mismatch)
    for optimizer, dtype in (("adamw", None), ("adafactor", None), ("adafactor", torch.bfloat16)):
        name = f"{optimizer}-{dtype}"
        _, plain = _train(tmp_path, f"plain-{name}", attach_kw={"optimizer": optimizer}, dtype=dtype, **common)
        _, layer = _train(
            tmp_path, f"layer-{name}", attach_kw={"optimizer": optimizer, "layerwise": True}, dtype=dtype, **common
        )
        a, b = _losses(plain), _losses(layer)
        assert all(abs(a[s] - b[s]) <= 1e-5 for s in a), name

    model = make_tiny_model(0)
    adapted = attach(model, "galore", rank=4, update_proj_gap=5, layerwise=True)
    args = training_args(tmp_path / "ga2", max_steps=10, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    trainer_kwargs = adapted.trainer_kwargs()
    trainer_kwargs["callbacks"].insert(0, NoTargetGrads())
    trainer = Trainer(model=adapted.model, args=args, train_dataset=TokenDataset(), **trainer_kwargs)
    trainer.train()
    losses = list(_losses(trainer).values())
    assert losses[-1] < losses[0] * 0.8
    assert seen and all(seen)


def test_a_second_layerwise_optimizer_takes_the_hooks_over(tmp_path):
    """A second Trainer on the same model: its optimizer's hooks replace the first one's, which would
    otherwise take every target gradient and free it before the new optimizer saw it (the weights stopped
    training, silently)."""
    adapted = attach(make_tiny_model(0), "galore", rank=4, update_proj_gap=3, layerwise=True)
    weight = adapted.model.model.layers[0].self_attn.q_proj.weight
    for run in ("first", "second"):
        args = training_args(tmp_path / run, max_steps=2)
        trainer = Trainer(model=adapted.model, args=args, train_dataset=TokenDataset(), **adapted.trainer_kwargs())
        before = weight.detach().clone()
        trainer.train()
        assert (weight - before).abs().max() > 1e-4, run
        assert len(weight._post_accumulate_grad_hooks) == 1, run


def test_adamw_takes_adam_settings_from_the_arguments_when_the_trainer_built_another_optimizer(tmp_path):
    """optim='adafactor' with GaLore AdamW: an Adafactor group's eps is a pair of floors, not AdamW's eps
    (it was taken over, and the first step failed adding a tuple)."""
    _, trainer = _train(tmp_path, optim="adafactor", max_steps=2, adam_epsilon=1e-7, adam_beta2=0.99)
    groups = _unwrap(trainer.optimizer).param_groups
    assert {(g["eps"], g["betas"]) for g in groups} == {(1e-7, (0.9, 0.99))}


@pytest.mark.parametrize("galore_optimizer, warns", [("adamw", True), ("adamw8bit", False)])
def test_an_8bit_trainer_optim_with_32bit_galore_moments_warns(tmp_path, caplog, galore_optimizer, warns):
    from hf_lowrank_galore.plugin import wrap_optimizer

    adapted = attach(make_tiny_model(0), "galore", rank=4, optimizer=galore_optimizer)
    args = training_args(tmp_path)
    args.optim = "adamw_bnb_8bit"
    wrap_optimizer(adapted.model, torch.optim.AdamW(adapted.model.parameters()), adapted.config, args)
    assert ("optimizer='adamw8bit'" in caplog.text) is warns


def test_layerwise_refuses_fp16_loss_scaling(tmp_path):
    """The hooks consume gradients before the loss scaler unscales them and skips overflowed steps."""
    from hf_lowrank_galore.plugin import wrap_optimizer

    adapted = attach(make_tiny_model(0), "galore", rank=4, layerwise=True)
    args = training_args(tmp_path)
    args.fp16 = True
    with pytest.raises(IncompatibleError, match="fp16 loss scaling.*use bf16=True or layerwise=False"):
        wrap_optimizer(adapted.model, torch.optim.AdamW(adapted.model.parameters()), adapted.config, args)


def test_export_writes_loadable_full_checkpoint(tmp_path):
    """export() writes merged/ with the trained weights, loadable by plain transformers."""
    adapted, _ = _train(tmp_path, max_steps=3)
    result = adapted.export(tmp_path / "out")
    assert result.adapter_dir is None and result.merged_dir == tmp_path / "out" / "merged"
    loaded = AutoModelForCausalLM.from_pretrained(result.merged_dir).eval()
    batch = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    adapted.model.eval()
    assert torch.equal(logits(loaded, batch), logits(adapted.model, batch))
    base = make_tiny_model(0)
    assert not torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


# ---------------------------------------------------------------- refusals


def test_refusals(tiny_model):
    """4-bit base, an adapter-carrying model, bad settings and rank too large fail with a fix."""
    with pytest.raises(IncompatibleError, match="quantized"):
        attach(tiny_model, "galore", load_in_4bit=True)
    lora = attach(make_tiny_model(0), "lora", r=4)
    with pytest.raises(IncompatibleError, match="adapter"):
        attach(lora.model, "galore")
    with pytest.raises(ConfigError, match="proj_type"):
        attach(tiny_model, "galore", proj_type="diagonal")
    with pytest.raises(ConfigError, match="rank 64 is larger"):
        attach(tiny_model, "galore", rank=64)
    model = attach(tiny_model, "galore", rank=4).model
    assert model is tiny_model and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("fields", [{"optimizer": "adafactor"}, {"optimizer": "adamw8bit"}, {"layerwise": True}])
def test_zero_refuses_what_needs_unprojected_weights_whole(tmp_path, fields):
    """Under ZeRO-1/2 only the projected weights are stepped whole; the other weights stay flat slices, so the
    settings that need their shape (or hooks before ZeRO's reduction) are refused when the optimizer is built."""
    from hf_lowrank_galore.plugin import wrap_optimizer

    adapted = attach(make_tiny_model(0), "galore", rank=4, **fields)
    args = training_args(tmp_path)
    args.deepspeed, args.hf_deepspeed_config = {"zero_optimization": {"stage": 2}}, None
    trainer_built = torch.optim.AdamW(adapted.model.parameters())
    with pytest.raises(
        IncompatibleError, match="cannot run under DeepSpeed ZeRO-2: .*use optimizer='adamw', layerwise=False"
    ):
        wrap_optimizer(adapted.model, trainer_built, adapted.config, args)
    args.deepspeed = None
    assert isinstance(
        wrap_optimizer(adapted.model, trainer_built, adapted.config, args), (GaLoreAdamW, GaLoreAdafactor)
    )
