"""Plugins cannot hurt each other or the user: bad plugins are reported, never silently used or lost."""

from __future__ import annotations

import types
from dataclasses import dataclass

import pytest
from transformers import Trainer

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins import registry as registry_module
from hf_lowrank_plugins.app.cli import main
from hf_lowrank_plugins.testing.helpers import TokenDataset, make_tiny_model, training_args


@dataclass
class FakeDist:
    name: str
    version: str = "1.0"


class FakeEntryPoint:
    """What the registry reads of an entry point: name, distribution and load()."""

    def __init__(self, name: str, plugin: object, dist: str) -> None:
        self.name, self._plugin, self.dist = name, plugin, FakeDist(dist)

    def load(self) -> object:
        if isinstance(self._plugin, BaseException):
            raise self._plugin
        return self._plugin


def _with_entry_points(monkeypatch, *extra: FakeEntryPoint) -> None:
    real = registry_module.entry_points
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [*real(group=group), *extra])


def _module(name: str, **functions) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, fn in functions.items():
        setattr(module, key, hlp.hookimpl(fn))
    return module


def test_a_plugin_that_exits_or_raises_at_import_is_reported_and_the_rest_load(monkeypatch, capsys):
    _with_entry_points(
        monkeypatch,
        FakeEntryPoint("exits", SystemExit(3), "bad-exit"),
        FakeEntryPoint("raises", RuntimeError("boom"), "bad-raise"),
    )
    hlp.set_registry(None)
    try:
        assert main(["list"]) == 0
    finally:
        hlp.set_registry(None)
    out, err = capsys.readouterr()
    assert "lora" in out and "failed to load plugin 'exits': SystemExit on import: 3" in err
    assert "failed to load plugin 'raises': RuntimeError on import: boom" in err


def test_a_misspelled_hook_is_a_load_failure(monkeypatch):
    from hf_lowrank_lora import LoraMethodConfig

    typo = _module(
        "typo",
        describe_methods=lambda: [hlp.MethodInfo(name="typo", config_class=LoraMethodConfig)],
        init_adaptor=lambda model, config: model,
    )
    _with_entry_points(monkeypatch, FakeEntryPoint("typo", typo, "typo-dist"))
    reg = hlp.Registry()
    assert "typo" not in reg.methods and "init_adaptor" in reg.failed["typo"] and "does not exist" in reg.failed["typo"]
    assert "lora" in reg.methods


def test_an_entry_point_name_clash_loads_both_and_is_reported(monkeypatch, capsys):
    from hf_lowrank_lora import LoraMethodConfig

    other = _module(
        "other", describe_methods=lambda: [hlp.MethodInfo(name="other_method", config_class=LoraMethodConfig)]
    )
    _with_entry_points(monkeypatch, FakeEntryPoint("lora", other, "someone-elses-lora"))
    reg = hlp.Registry()
    assert reg.get("lora").distribution == "hf-lowrank-lora"  # the real LoRA did not vanish
    assert reg.get("other_method").plugin_name == "lora@someone-elses-lora"
    assert reg.clashes == {"lora": ["hf-lowrank-lora", "someone-elses-lora"]}
    hlp.set_registry(reg)
    try:
        assert main(["list"]) == 0
    finally:
        hlp.set_registry(None)
    assert "entry point 'lora' is declared by hf-lowrank-lora and someone-elses-lora" in capsys.readouterr().err


def test_two_distributions_claiming_one_method_exit_2_naming_both(monkeypatch, capsys, tmp_path):
    from hf_lowrank_lora import LoraMethodConfig

    impostor = _module(
        "impostor", describe_methods=lambda: [hlp.MethodInfo(name="lora", config_class=LoraMethodConfig)]
    )
    _with_entry_points(monkeypatch, FakeEntryPoint("impostor", impostor, "evil-lora"))
    hlp.set_registry(None)
    try:
        assert main(["train", "--method", "lora", "--output-dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "hf-lowrank-lora" in err[0] and "evil-lora" in err[0]
        assert "HF_LOWRANK_BLOCK_PLUGINS=impostor" in err[0]
        assert main(["list"]) == 0
        assert "method 'lora' is claimed by hf-lowrank-lora (plugin 'lora') and evil-lora" in capsys.readouterr().err
    finally:
        hlp.set_registry(None)
    assert not (tmp_path / "out").exists()
    blocked = hlp.Registry(blocked=["evil-lora"])  # by distribution name
    assert blocked.get("lora").distribution == "hf-lowrank-lora"


def test_hook_failures_and_wrong_results_name_the_plugin_and_the_hook(tiny_model):
    from hf_lowrank_lora import LoraMethodConfig

    class Broken:
        cfg = type("BrokenCfg", (LoraMethodConfig,), {})

        @hlp.hookimpl
        def describe_methods(self):
            return [hlp.MethodInfo(name="broken", config_class=self.cfg)]

        @hlp.hookimpl
        def init_adapter(self, model, config):
            if config.r == 3:
                return "not a model"
            raise KeyError("internal bug")

    reg = hlp.Registry(autoload=False)
    reg.register(Broken(), name="broken-plugin")
    with pytest.raises(
        hlp.PluginError,
        match=r"plugin 'broken-plugin' .* failed in init_adapter for method 'broken': "
        r"KeyError: 'internal bug'",
    ):
        hlp.attach(tiny_model, "broken", r=2, registry=reg)
    with pytest.raises(hlp.PluginError, match="init_adapter for method 'broken' returned str, expected Module"):
        hlp.attach(make_tiny_model(), "broken", r=3, registry=reg)


def test_declarations_are_derived_from_the_hooks():
    reg = hlp.get_registry()
    assert reg.get("galore").wraps_optimizer and reg.get("galore").trainer_hooks == {"wrap_optimizer"}
    # SALOR hangs its step schedule on the Trainer's own optimizer, at training start
    assert not reg.get("salor").wraps_optimizer and reg.get("salor").trainer_hooks == {"on_train_begin"}
    assert not reg.get("lora").wraps_optimizer and reg.get("lora_ga").needs_trainer_hooks
    corda = reg.get("corda").as_dict()
    assert corda["supports_quantized_base"] is False and "CorDA decomposes" in corda["no_quantized_base"]
    assert reg.get("lora_ga").supports_quantized_base  # QLoRA-GA
    with pytest.raises(hlp.IncompatibleError, match="cannot train on a quantized .4-bit. base: CorDA decomposes"):
        hlp.attach(make_tiny_model(), "corda", r=2, load_in_4bit=True)


@pytest.mark.parametrize("after_a_run", [False, True], ids=["fresh", "after-a-run-with-them"])
@pytest.mark.parametrize(
    "method, settings",
    [("galore", {"rank": 4}), ("salor", {"r": 2}), ("lora_ga", {"r": 2}), ("eva", {"r": 2, "rho": 4.0})],
)
@pytest.mark.integration
def test_training_without_the_trainer_hooks_is_refused_at_the_first_step(tmp_path, method, settings, after_a_run):
    """Also once a Trainer with the hooks has trained the model: a later plain Trainer would otherwise train
    GaLore as plain AdamW, SALOR without its schedule. EVA re-creates layers at new ranks when training
    begins, so the guard is hung again on a parameter that still trains."""
    adapted = hlp.attach(make_tiny_model(), method, **settings)
    if after_a_run:
        args = training_args(tmp_path / "with", max_steps=1)
        Trainer(model=adapted.model, args=args, train_dataset=TokenDataset(), **adapted.trainer_kwargs()).train()
    trainer = Trainer(model=adapted.model, args=training_args(tmp_path, max_steps=2), train_dataset=TokenDataset())
    with pytest.raises(hlp.LowRankError, match=rf"method '{method}' needs its Trainer hooks .*trainer_kwargs"):
        trainer.train()


def test_attaching_twice_or_to_another_base_names_both(tmp_path, tiny_model, batch):
    adapted = hlp.attach(tiny_model, "lora", r=2)
    with pytest.raises(hlp.IncompatibleError, match="method 'lora' is already attached .* method 'dora' would train"):
        hlp.attach(tiny_model, "dora", r=2)
    galore_base = make_tiny_model()
    hlp.attach(galore_base, "galore", rank=4)
    with pytest.raises(hlp.IncompatibleError, match="method 'galore' is already attached"):
        hlp.attach(galore_base, "lora", r=2)
    saved = adapted.export(tmp_path / "out").adapter_dir
    wider = make_tiny_model(intermediate_size=96)
    with pytest.raises(
        hlp.IncompatibleError,
        match=r"holds 'model.layers.0.mlp.\w+_proj.lora_[AB].weight' of shape \(\d+, 128\), but on this "
        r"LlamaForCausalLM it has shape \(\d+, 96\)",
    ):
        hlp.load_adapter(wider, saved)


def test_a_method_name_users_could_not_type_is_a_load_failure_naming_the_spelling():
    """A third-party ``LoRA`` would be listed beside ``lora`` but never selected (names match in lower case)."""
    from hf_lowrank_lora import LoraMethodConfig

    reg = hlp.Registry(autoload=False)
    shouting = _module(
        "shouting", describe_methods=lambda: [hlp.MethodInfo(name="LoRA", config_class=LoraMethodConfig)]
    )
    with pytest.raises(hlp.PluginError, match=r"method name 'LoRA' cannot be typed .* declare it as 'lora'"):
        reg.register(shouting, name="shouting")
    assert "LoRA" not in reg.methods and reg.pm.get_plugin("shouting") is None
    assert hlp.get_registry().get("LoRA-GA").name == "lora_ga"  # typed names still match case-insensitively


def test_a_failure_is_blamed_on_the_plugin_that_raised_not_on_the_method():
    """An observer answering every method's hook fails: the one line names the observer, not ``full``."""

    @hlp.hookimpl(tryfirst=True)  # before the method's own answer, whichever plugin was imported first
    def init_adapter(model, config):
        raise KeyError("observer bug")

    reg = hlp.Registry(autoload=False)
    watcher = types.ModuleType("watcher")
    watcher.init_adapter = init_adapter
    reg.register(watcher, name="watcher")
    with pytest.raises(hlp.PluginError, match=r"plugin 'watcher' \(registered by hand\) failed in init_adapter for "):
        hlp.attach(make_tiny_model(), "full", registry=reg)


def test_plan_memory_returning_junk_names_the_plugin():
    from hf_lowrank_plugins.plan import plan_memory
    from hf_lowrank_plugins.testing.helpers import tiny_llama_config

    def plan_memory_hook(model, config, settings, terms):
        return {"buffers": "lots"}

    reg = hlp.Registry(autoload=False)
    reg.register(_module("junk", plan_memory=plan_memory_hook), name="junk")
    with pytest.raises(hlp.PluginError, match=r"^plugin 'junk': plan_memory for method 'full' returned \{'buffers'"):
        plan_memory(tiny_llama_config(), "full", hlp.PlanSettings(), registry=reg)
    from hf_lowrank_lora import LoraMethodConfig

    junk_method = _module(
        "junk_method",
        describe_methods=lambda: [hlp.MethodInfo(name="junk_method", config_class=LoraMethodConfig)],
        init_adapter=lambda model, config: model,
        plan_memory=lambda model, config, settings, terms: {"buffers": -1.0},
    )
    alone = hlp.Registry(autoload=False)
    alone.register(junk_method, name="junk-method")
    with pytest.raises(hlp.PluginError, match=r"^plugin 'junk-method': plan_memory .* returned \{'buffers': -1.0\}"):
        plan_memory(tiny_llama_config(), "junk_method", hlp.PlanSettings(), registry=alone)


@pytest.mark.parametrize("by_hand", [True, False], ids=["build_optimizer", "a-plain-adamw"])
def test_a_loop_of_ones_own_arms_the_guard_through_build_optimizer(by_hand):
    """The documented way to train GaLore without a Trainer, and the message that names it."""
    import torch

    adapted = hlp.attach(make_tiny_model(), "galore", rank=4)
    args = training_args("unused", max_steps=1)
    trainable = [p for p in adapted.model.parameters() if p.requires_grad]
    optimizer = adapted.build_optimizer(adapted.model, args) if by_hand else torch.optim.AdamW(trainable)
    batch = TokenDataset()[0]
    loss = adapted.model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss
    if not by_hand:
        with pytest.raises(hlp.LowRankError, match=r"in a training loop of your own, train with the optimizer of "):
            loss.backward()
        return
    loss.backward()
    optimizer.step()
    assert type(optimizer).__module__.startswith("hf_lowrank_galore")


def test_an_adapter_of_another_base_is_refused_for_any_peft_tuner(tmp_path):
    """The check compares with what PEFT itself lays on the base, so it holds beyond LoRA's A and B:
    an IA3 adapter (vectors of the layers' widths) on a wider base is refused naming the tensor, and the
    base model it was given is left as it was."""
    from peft import IA3Config, get_peft_model

    from hf_lowrank_plugins.loading import check_adapter_fits

    adapter = get_peft_model(
        make_tiny_model(), IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"])
    )
    adapter.save_pretrained(tmp_path / "ia3")
    check_adapter_fits(make_tiny_model(), tmp_path / "ia3")  # the same architecture fits
    wider = make_tiny_model(intermediate_size=96)
    before = {name: tuple(p.shape) for name, p in wider.named_parameters()}
    with pytest.raises(hlp.IncompatibleError, match=r"'model.layers.0.mlp.down_proj.ia3_l' of shape \(1, 128\)"):
        check_adapter_fits(wider, tmp_path / "ia3")
    assert {name: tuple(p.shape) for name, p in wider.named_parameters()} == before
