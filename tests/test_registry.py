"""Discovery through entry points, method lookup errors, and switches."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins import registry as registry_module
from hf_lowrank_plugins.registry import ENV_BLOCK, ENV_DISABLE_AUTOLOAD, Registry


def test_installed_plugins_are_discovered_with_their_distribution():
    reg = Registry()
    assert {"lora", "qlora"} <= set(reg.methods)
    lora = reg.methods["lora"]
    assert lora.distribution == "hf-lowrank-lora" and lora.version == "0.1.0"
    assert lora.config_class.__name__ == "LoraMethodConfig"
    assert reg.methods["qlora"].requires_quantized_base


def test_unknown_method_lists_installed_ones_and_how_to_install():
    reg = Registry()
    with pytest.raises(hlp.UnknownMethodError) as err:
        reg.get("lorra")
    msg = str(err.value)
    assert "unknown method 'lorra'" in msg and "Did you mean 'lora'" in msg
    assert "lora" in msg and "qlora" in msg and "pip install" in msg


def test_method_names_are_normalised():
    assert Registry().get("LoRA").name == "lora"


def test_disable_autoload_and_block(monkeypatch):
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, "1")
    assert set(Registry().methods) == {"full"}  # the built-in baseline only
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD)
    monkeypatch.setenv(ENV_BLOCK, "qlora")
    reg = Registry()
    assert "qlora" not in reg.methods and "lora" in reg.methods


def test_broken_plugin_is_reported_and_others_still_load(monkeypatch):
    real = registry_module.entry_points

    def with_broken(group):
        eps = list(real(group=group))
        return eps + [EntryPoint(name="broken", value="hf_lowrank_no_such_module", group=group)]

    monkeypatch.setattr(registry_module, "entry_points", with_broken)
    reg = Registry()
    assert "lora" in reg.methods  # imports every plugin: the broken one's failure is recorded
    assert "broken" in reg.failed and "ModuleNotFoundError" in reg.failed["broken"]
    with pytest.raises(hlp.UnknownMethodError, match="failed to load: broken"):
        reg.get("nothing")


def test_two_plugins_claiming_one_name_never_run_silently(monkeypatch):
    import hf_lowrank_lora.plugin as lora_plugin
    from hf_lowrank_lora import LoraMethodConfig

    reg = Registry(autoload=False)
    reg.register(lora_plugin, name="lora", distribution=("hf-lowrank-lora", "0.1.0"))

    class Impostor:
        @hlp.hookimpl
        def describe_methods(self):
            return [hlp.MethodInfo(name="lora", config_class=LoraMethodConfig)]

    reg.register(Impostor(), name="impostor", distribution=("evil-lora", "9.9"))
    assert "lora" not in reg.methods and [i.plugin_name for i in reg.conflicts["lora"]] == ["lora", "impostor"]
    with pytest.raises(
        hlp.ConfigError,
        match=r"both plugin 'lora' \(hf-lowrank-lora\) and plugin 'impostor' "
        r"\(evil-lora\); block one with HF_LOWRANK_BLOCK_PLUGINS=impostor",
    ):
        reg.get("lora")
    monkeypatch.setenv(ENV_BLOCK, "impostor")
    blocked = Registry(autoload=False, blocked=["impostor"])
    blocked.register(lora_plugin, name="lora")
    blocked.register(Impostor(), name="impostor")
    assert blocked.get("lora").plugin_name == "lora"


def test_method_hooks_reach_only_the_owning_plugin(tiny_model):
    """A second method's init_adapter is never consulted for the first method."""
    import hf_lowrank_lora.plugin as lora_plugin

    calls = []

    class Other:
        @hlp.hookimpl
        def describe_methods(self):
            from hf_lowrank_lora import LoraMethodConfig

            return [hlp.MethodInfo(name="other", config_class=type("OtherConfig", (LoraMethodConfig,), {}))]

        @hlp.hookimpl
        def init_adapter(self, model, config):
            calls.append("other")
            return model

    reg = Registry(autoload=False)
    reg.register(lora_plugin, name="lora")
    reg.register(Other(), name="other")
    adapted = hlp.attach(tiny_model, "lora", r=2, registry=reg)
    assert calls == [] and adapted.method.name == "lora"


def test_make_config_rejects_unknown_fields_and_maps_rank():
    cfg = hlp.make_config("lora", rank=4, alpha=8)
    assert cfg.r == 4 and cfg.lora_alpha == 8
    with pytest.raises(hlp.ConfigError, match="unknown option.*lora_alfa.*Did you mean 'lora_alpha'"):
        hlp.make_config("lora", lora_alfa=3)
    with pytest.raises(hlp.ConfigError, match="rank and r set the same option"):
        hlp.make_config("lora", rank=4, r=8)
