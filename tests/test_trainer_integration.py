"""The callback + optimizer factory inside a plain Trainer: accumulation, eval, resume, bf16, misuse."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import Trainer

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.testing.helpers import TORCHRUN_TWO_PROCESSES, TokenDataset, make_tiny_model, training_args

pytestmark = pytest.mark.integration  # end to end: left out of `make test-fast`


def _losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


#: every adapter method with the options that change its Trainer-time behaviour
METHODS = {
    "lora": {},
    "dora": {},
    "pissa": {"svd": "fast", "svd_niter": 2},  # resume re-attaches: the seeded SVD must rebuild W_res exactly
}


def _run(tmp_path, name, resume=None, method="lora", **kw):
    adapted = hlp.attach(make_tiny_model(), method, r=4, **METHODS[method])
    args = training_args(
        tmp_path / name,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=4,
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="steps",
        save_steps=4,
        weight_decay=0.01,
        adam_beta2=0.99,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        **kw,
    )
    trainer = Trainer(
        model=adapted.model,
        args=args,
        train_dataset=TokenDataset(),
        eval_dataset=TokenDataset(16),
        **adapted.trainer_kwargs(),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, adapted


@pytest.mark.parametrize("method", METHODS)
def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tmp_path, method):
    """Accumulation 2, eval, cosine schedule with warm-up, weight decay: resuming at step 8 changes nothing."""
    full, _ = _run(tmp_path, "full", method=method)
    resumed, _ = _run(tmp_path, "full", resume=str(tmp_path / "full" / "checkpoint-8"), method=method)
    uninterrupted = _losses(full)
    after = _losses(resumed)
    assert len(after) == len(uninterrupted) == 12  # log history is restored from the checkpoint
    assert after[-4:] == pytest.approx(uninterrupted[-4:], abs=1e-5)  # steps 9-12 trained after resuming
    evals = [e["eval_loss"] for e in full.state.log_history if "eval_loss" in e]
    assert len(evals) == 3 and evals[-1] < evals[0]


def test_the_factory_builds_the_trainers_own_optimizer(tmp_path):
    """Class, lr, betas, eps and decay groups match what Trainer builds without our factory."""
    adapted = hlp.attach(make_tiny_model(), "lora", r=4)
    args = training_args(tmp_path / "a", weight_decay=0.1, adam_beta1=0.8, adam_epsilon=1e-6, learning_rate=3e-3)
    ours = Trainer(model=adapted.model, args=args, train_dataset=TokenDataset(), **adapted.trainer_kwargs())
    ours.create_optimizer()
    plain = Trainer(model=adapted.model, args=args, train_dataset=TokenDataset())
    plain.create_optimizer()
    assert type(ours.optimizer) is type(plain.optimizer)
    for g_ours, g_plain in zip(ours.optimizer.param_groups, plain.optimizer.param_groups, strict=True):
        assert {k: v for k, v in g_ours.items() if k != "params"} == {k: v for k, v in g_plain.items() if k != "params"}
        assert [id(p) for p in g_ours["params"]] == [id(p) for p in g_plain["params"]]


def test_an_8bit_optimizer_keeps_32bit_state_for_embeddings_as_the_trainer_does(tmp_path):
    """The Trainer registers bitsandbytes' 32-bit override for embeddings only for an optimizer it built itself."""
    pytest.importorskip("bitsandbytes")
    states = []
    for ours in (True, False):
        adapted = hlp.attach(make_tiny_model(), "full")
        args = training_args(tmp_path / str(ours), max_steps=1, optim="adamw_bnb_8bit")
        kwargs = adapted.trainer_kwargs() if ours else {}
        trainer = Trainer(model=adapted.model, args=args, train_dataset=TokenDataset(), **kwargs)
        trainer.train()
        embedding = adapted.model.get_input_embeddings().weight
        states.append(trainer.optimizer.state[embedding]["state1"].dtype)
    assert states == [torch.float32, torch.float32]


@pytest.mark.parametrize("method", ["lora", "galore"])
def test_two_trainers_on_one_adapted_model_each_build_from_their_own_arguments(tmp_path, method):
    """The second Trainer built must not hand its settings to the first one's optimizer."""
    adapted = hlp.attach(make_tiny_model(), method, rank=4)
    first_args = training_args(tmp_path / "a", learning_rate=5e-3, adam_beta2=0.95, weight_decay=0.1)
    second_args = training_args(tmp_path / "b", learning_rate=1e-6, adam_beta2=0.999, weight_decay=0.0)
    first = Trainer(model=adapted.model, args=first_args, train_dataset=TokenDataset(), **adapted.trainer_kwargs())
    second = Trainer(model=adapted.model, args=second_args, train_dataset=TokenDataset(), **adapted.trainer_kwargs())
    for trainer, args in ((first, first_args), (second, second_args)):
        trainer.create_optimizer()
        groups = trainer.optimizer.param_groups
        assert {(g["lr"], g["betas"][1]) for g in groups} == {(args.learning_rate, args.adam_beta2)}
        assert max(g["weight_decay"] for g in groups) == args.weight_decay


@pytest.mark.parametrize(
    "method, settings, refused",
    [
        ("lora", {}, False),
        ("pissa", {"svd": "fast"}, True),
        ("lora_ga", {}, True),
        ("salor", {}, True),
        ("loftq", {}, False),
        ("loftq", {"loftq_iter": 2}, True),
    ],
    ids=["lora", "pissa", "lora_ga", "salor", "loftq", "loftq-2-alternations"],
)
def test_a_trainer_checkpoint_loads_only_where_it_is_the_model(tmp_path, method, settings, refused):
    """A checkpoint of a method that rewrote its base (PiSSA's residual, LoRA-GA's, SALOR's pruning, LoftQ's
    with alternations) loaded onto the original base was silently another model; LoRA's checkpoint is its
    model, and so is LoftQ's with one alternation (its base is NF4(W), which loading in 4-bit rebuilds)."""
    adapted = hlp.attach(make_tiny_model(), method, r=2, **settings)
    args = training_args(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2)
    trainer = Trainer(model=adapted.model, args=args, train_dataset=TokenDataset(), **adapted.trainer_kwargs())
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))  # PEFT's save of the training state, without trainer_state.json
    checkpoint = tmp_path / "run" / "checkpoint-2"
    if refused:
        for folder in (checkpoint, tmp_path / "saved"):
            with pytest.raises(hlp.IncompatibleError, match=f"training state of method '{method}'.*export"):
                hlp.load_adapter(make_tiny_model(), folder)
        return
    batch = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    loaded = hlp.load_adapter(make_tiny_model(), checkpoint).model.eval()  # LoftQ's base quantized as attach did
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, adapted.model.eval()(batch).logits)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_mixed_precision_trains(tmp_path, method):
    trainer, _ = _run(tmp_path, "bf16", method=method, bf16=True)
    losses = _losses(trainer)
    assert losses[-1] < losses[0]


def test_trainer_given_another_model_is_refused(tmp_path):
    adapted = hlp.attach(make_tiny_model(), "lora", r=2)
    with pytest.raises(hlp.LowRankError, match="pass model=adapted.model"):
        Trainer(
            model=make_tiny_model(),
            args=training_args(tmp_path),
            train_dataset=TokenDataset(),
            **adapted.trainer_kwargs(),
        )


def test_optimizer_method_without_the_factory_says_what_is_missing(tmp_path):
    import hf_lowrank_lora.plugin as lora_plugin
    from hf_lowrank_lora import LoraMethodConfig

    class Wrapping:
        cfg = type("WrapCfg", (LoraMethodConfig,), {})

        @hlp.hookimpl
        def describe_methods(self):
            return [hlp.MethodInfo(name="wrapping", config_class=self.cfg)]

        @hlp.hookimpl
        def init_adapter(self, model, config):
            return lora_plugin.init_adapter(model, config)

        @hlp.hookimpl
        def wrap_optimizer(self, model, optimizer, config, args):  # implementing it is the declaration
            return None

    reg = hlp.Registry(autoload=False)
    reg.register(Wrapping(), name="wrapping")
    adapted = hlp.attach(make_tiny_model(), "wrapping", r=2, registry=reg)
    trainer = Trainer(
        model=adapted.model,
        args=training_args(tmp_path, max_steps=1),
        train_dataset=TokenDataset(),
        callbacks=[adapted.callback],
    )  # optimizer factory forgotten
    with pytest.raises(hlp.LowRankError, match=r"replaces the optimizer.*adapted.trainer_kwargs\(\)"):
        trainer.train()


def test_on_train_begin_runs_on_every_train_and_says_whether_the_run_resumed(tmp_path):
    """The hook sees the Trainer's dataloader and the torch optimizer inside accelerate's wrapper,
    after the checkpoint is restored (the optimizer already holds its moments on resume)."""
    import hf_lowrank_lora.plugin as lora_plugin
    from hf_lowrank_lora import LoraMethodConfig

    seen = []

    class DataInit:
        cfg = type("DataInitCfg", (LoraMethodConfig,), {})

        @hlp.hookimpl
        def describe_methods(self):
            return [hlp.MethodInfo(name="datainit", config_class=self.cfg)]

        @hlp.hookimpl
        def init_adapter(self, model, config):
            return lora_plugin.init_adapter(model, config)

        @hlp.hookimpl
        def on_train_begin(self, model, config, optimizer, train_dataloader, resumed):
            moments = sum("exp_avg" in state for state in optimizer.state.values())
            seen.append((resumed, next(iter(train_dataloader))["input_ids"].shape, type(optimizer), moments > 0))
            return False

    reg = hlp.Registry(autoload=False)
    reg.register(DataInit(), name="datainit")
    for resume in (None, str(tmp_path / "checkpoint-2")):
        adapted = hlp.attach(make_tiny_model(), "datainit", r=2, registry=reg)
        args = training_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
        Trainer(model=adapted.model, args=args, train_dataset=TokenDataset(), **adapted.trainer_kwargs()).train(
            resume_from_checkpoint=resume
        )
    fresh, resumed = (
        (False, torch.Size([8, 16]), torch.optim.AdamW, False),
        (True, torch.Size([8, 16]), torch.optim.AdamW, True),
    )
    assert seen == [fresh, resumed]


LONE_PROCESS = """
import sys
import hf_lowrank_plugins as hlp
from transformers import Trainer, TrainingArguments
from hf_lowrank_plugins.testing.helpers import TokenDataset, make_tiny_model

adapted = hlp.attach(make_tiny_model(), "lora", r=2)
args = TrainingArguments(sys.argv[1], max_steps=2, report_to=[], disable_tqdm=True, save_strategy="no")  # no use_cpu
try:
    Trainer(model=adapted.model, args=args, train_dataset=TokenDataset(), **adapted.trainer_kwargs()).train()
    print("TRAINED ALONE")
except hlp.LowRankError as exc:
    print("REFUSED", exc)
"""


@pytest.mark.ddp
def test_a_launched_process_without_a_process_group_is_refused(tmp_path):
    """torchrun on CPU without use_cpu=True: each process would train alone (no DDP); we refuse instead."""
    import os
    import subprocess

    script = tmp_path / "lone.py"
    script.write_text(LONE_PROCESS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [
            *TORCHRUN_TWO_PROCESSES,
            str(script),
            str(tmp_path / "out"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # counted in the whole output: the two processes' lines can interleave on one line of the shared pipe
    assert proc.stdout.count("REFUSED") == 2 and "TRAINED ALONE" not in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert (
        "WORLD_SIZE=2" in proc.stdout and "use_cpu=True" in proc.stdout and "torchrun --nproc_per_node 2" in proc.stdout
    )


@pytest.mark.parametrize("method, stage", [("galore", 3), ("galore", 1), ("lora_ga", 3), ("galore", 0)])
def test_every_method_declares_every_zero_stage(tmp_path, method, stage):
    """The Trainer-time check reads the ZeRO stage from TrainingArguments' DeepSpeed config."""
    from hf_lowrank_plugins.distributed import check_parallelism, zero_stage

    args = training_args(tmp_path)
    args.deepspeed, args.hf_deepspeed_config = {"zero_optimization": {"stage": stage}}, None
    assert zero_stage(args) == stage and zero_stage(training_args(tmp_path)) is None
    check_parallelism(hlp.get_registry().get(method), args)


@pytest.mark.parametrize("stage, refused", [(2, True), (1, False)])
def test_a_declared_zero_limit_refuses_the_trainer_at_construction(tmp_path, stage, refused):
    """A method that declares ``max_zero_stage`` (none of ours does today) is refused by the callback at
    ``on_init_end``, with its reason and the stages it allows."""
    import dataclasses

    adapted = hlp.attach(make_tiny_model(), "lora", r=4)
    adapted.method = dataclasses.replace(adapted.method, max_zero_stage=1, zero_reason="it needs whole weights")
    args = training_args(tmp_path)
    args.deepspeed, args.hf_deepspeed_config = {"zero_optimization": {"stage": stage}}, None
    on_init_end = functools.partial(adapted.callback.on_init_end, args, None, None, model=adapted.model)
    if not refused:
        on_init_end()
        return
    with pytest.raises(
        hlp.IncompatibleError,
        match="'lora' cannot train under DeepSpeed ZeRO-2: it needs whole weights; .*up to ZeRO-1",
    ):
        on_init_end()


@pytest.mark.parametrize(
    "method, refused", [("galore", "flat shards"), ("lora_ga", "summon_full_params"), ("dora", None)]
)
def test_fsdp_refusals_come_from_the_method_declaration(tmp_path, method, refused):
    """FSDP runs only on GPUs (the Trainer refuses it in one CPU process), so the check is called directly
    with FSDP arguments, as the callback calls it at on_init_end."""
    from hf_lowrank_plugins.distributed import check_parallelism

    args = training_args(tmp_path, fsdp=True)
    info = hlp.get_registry().get(method)
    if refused is None:
        check_parallelism(info, args)
    else:
        with pytest.raises(hlp.IncompatibleError, match=f"'{method}' cannot train under FSDP: .*{refused}"):
            check_parallelism(info, args)


def test_accelerate_launch_settings_from_the_environment_are_checked_too(tmp_path, monkeypatch):
    """`accelerate launch --use_fsdp` / `--use_deepspeed --zero_stage N` configure the Trainer through the
    environment, not through TrainingArguments' fields: the refusals read it there as well."""
    from hf_lowrank_plugins.distributed import check_parallelism, zero_stage

    registry = hlp.get_registry()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(hlp.IncompatibleError, match="'galore' cannot train under FSDP"):
        check_parallelism(registry.get("galore"), training_args(tmp_path))
    check_parallelism(registry.get("dora"), training_args(tmp_path))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    try:
        args = training_args(tmp_path)
        assert not args.deepspeed and zero_stage(args) == 3
        with pytest.raises(hlp.IncompatibleError, match="'corda' cannot train under DeepSpeed ZeRO-3"):
            check_parallelism(registry.get("corda"), args)
    finally:
        unset_hf_deepspeed_config()  # else later models would be built partitioned (deepspeed.zero.Init)


def test_master_weights_are_refreshed_through_optimizer_wrappers():
    """A DeepSpeed optimizer inside accelerate's wrapper gets refresh_fp32_params(); plain torch ones are left."""
    from hf_lowrank_plugins.distributed import refresh_master_weights

    class Masters:
        refreshed = 0

        def refresh_fp32_params(self):
            self.refreshed += 1

    class Wrapper:
        def __init__(self, inner):
            self.optimizer = inner

    inner = Masters()
    assert refresh_master_weights(Wrapper(Wrapper(inner))) and inner.refreshed == 1
    assert not refresh_master_weights(Wrapper(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)))
