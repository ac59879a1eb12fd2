"""Loading a saved adapter: its config as the method's own class, refusals of adapters that would load as
another model (a training state of a base-rewriting method, a base of another shape), and PEFT's load."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peft import PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .api import Adapted, check_argument
from .errors import IncompatibleError, LowRankError
from .export import METHOD_SETTINGS_FILE
from .method import config_fields, default_init_fields, name_config
from .quantization import is_quantized, quantize_model
from .registry import Registry, get_registry
from .types import MethodInfo, QuantizationSettings


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The raw ``adapter_config.json`` of a saved adapter, with a clear error if it is missing or unreadable."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise LowRankError(f"{adapter_dir} is not a saved adapter: {path.name} not found")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise LowRankError(f"{path} is not valid JSON ({exc}); the adapter is corrupt, export it again") from None
    if not isinstance(raw, dict):
        raise LowRankError(f"{path} does not hold a JSON object; the adapter is corrupt, export it again")
    return raw


def read_method_settings(adapter_dir: str | Path) -> dict[str, Any] | None:
    """Our method's name and settings saved beside a PEFT adapter (:data:`METHOD_SETTINGS_FILE`), if any."""
    path = Path(adapter_dir) / METHOD_SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise LowRankError(f"{path} is not valid JSON ({exc}); the adapter is corrupt, export it again") from None
    return data if isinstance(data, dict) else None


def load_config(adapter_dir: str | Path, registry: Registry | None = None) -> PeftConfig:
    """Load a saved adapter's config as our method's class when its plugin is installed.

    The method and its settings come from :data:`METHOD_SETTINGS_FILE` (``adapter_config.json``
    holds only what PEFT's own config class accepts, so plain PEFT loads it silently). Adapters
    written without our package come back as PEFT's own class (e.g. ``LoraConfig``).
    """
    registry = registry or get_registry()
    raw = read_adapter_config(adapter_dir)
    ours = read_method_settings(adapter_dir) or {}
    name = ours.get("method") or raw.get("hf_lowrank_method")  # a Trainer checkpoint: PEFT saved every field
    info = registry.find(name) if isinstance(name, str) and name else None
    if info is not None:
        # PeftConfig.from_pretrained maps peft_type LORA back to LoraConfig; build our class directly
        config_class = info.config_class
        valid = config_fields(config_class)
        settings = {**raw, **ours.get("settings", {})}
        config = config_class(**{k: v for k, v in settings.items() if k in valid})
        name_config(config, info.name)
        return config
    try:
        return PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as exc:
        raise LowRankError(
            f"{adapter_dir}: PEFT cannot read this adapter's config ({type(exc).__name__}: {exc})"
        ) from None


def check_not_a_training_state(adapter_dir: str | Path, info: MethodInfo, config: PeftConfig | None = None) -> None:
    """Raise :class:`IncompatibleError` for a Trainer checkpoint of a method whose deliverable is not its
    training state.

    A method that trains an adapter and writes its own deliverables (``post_train_merge``: PiSSA and
    LoRA-GA train on a base they rewrote, SALOR on a pruned one) saves checkpoints that hold only
    with that rewritten base; loaded onto the original, they are a different model, silently. A config
    whose deliverables depend on its settings says which with ``rewrites_base()`` (LoftQ: only with
    more than one alternation).
    """
    rewrites_base = getattr(config, "rewrites_base", None)
    if callable(rewrites_base):
        if not rewrites_base():
            return
    elif not (info.trains_adapter and "post_train_merge" in info.hooks):
        return
    folder = Path(adapter_dir)
    # export() moves our settings out of adapter_config.json into METHOD_SETTINGS_FILE; PEFT's own save
    # (a Trainer checkpoint, trainer.save_model) leaves them in
    saved_by_peft = "hf_lowrank_method" in read_adapter_config(folder) and not (folder / METHOD_SETTINGS_FILE).is_file()
    if (folder / "trainer_state.json").is_file() or saved_by_peft:
        raise IncompatibleError(
            f"{adapter_dir} is the training state of method '{info.name}' (a Trainer checkpoint or "
            "trainer.save_model), which holds only with the base the method rewrote when it attached; resume from "
            "it (--resume-from-checkpoint) and export, or load the adapter/ that adapted.export() wrote"
        )


def check_adapter_fits(base_model: nn.Module, adapter_dir: str | Path) -> None:
    """Raise :class:`IncompatibleError` unless every tensor of the adapter in ``adapter_dir`` has its
    place, with its shape, in the adapter PEFT lays on ``base_model``, naming the first that differs.

    The expected tensors come from PEFT itself (its config of the adapter, laid on a meta-device twin
    of ``base_model``: no memory, and the model is untouched), so the check holds for every PEFT
    tuner, not only LoRA's ``lora_A``/``lora_B`` layout.
    """
    from safetensors import safe_open

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        return  # a .bin adapter: PEFT's own error will tell
    try:
        with safe_open(str(weights), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:
        raise LowRankError(f"{weights} is not a readable safetensors file ({exc}); export the adapter again") from None
    expected = _expected_adapter_shapes(base_model, adapter_dir)
    if expected is None:
        return
    base_name = type(base_model).__name__
    for key, shape in shapes.items():
        name = key.removeprefix("base_model.model.")
        if key not in expected:
            raise IncompatibleError(
                f"adapter {adapter_dir} holds '{name}', for which this {base_name} has no layer: it was trained on "
                "another base model; load the base it names in adapter_config.json (base_model_name_or_path)"
            )
        if expected[key] != shape:
            raise IncompatibleError(
                f"adapter {adapter_dir} holds '{name}' of shape {tuple(shape)}, but on this {base_name} it has shape "
                f"{expected[key]}: the adapter was trained on another base model; load the one it names"
            )


def _expected_adapter_shapes(base_model: nn.Module, adapter_dir: str | Path) -> dict[str, tuple[int, ...]] | None:
    """The tensor names and shapes PEFT saves for the adapter of ``adapter_dir`` on ``base_model``'s
    architecture, from a twin built on the meta device; ``None`` for a model transformers cannot rebuild
    from its config, or an adapter config PEFT cannot read (its own loading then reports)."""
    from accelerate import init_empty_weights
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import PreTrainedModel

    if not isinstance(base_model, PreTrainedModel):
        return None
    try:
        peft_config = PeftConfig.from_pretrained(str(adapter_dir))
    except Exception:
        return None
    for name, value in default_init_fields(type(peft_config)).items():  # no data-dependent init on meta
        setattr(peft_config, name, value)
    with init_empty_weights():
        twin = type(base_model)(base_model.config)
        twin_peft = get_peft_model(twin, peft_config)
    # whole embedding rows an adapter may carry (a resized vocabulary) are checked against the base's own weights;
    # PEFT's "auto" would look the base up on the Hub to decide whether to list them
    expected = {f"base_model.model.{name}": tuple(p.shape) for name, p in twin.named_parameters()}
    state = get_peft_model_state_dict(twin_peft, save_embedding_layers=False)
    return {**expected, **{key: tuple(tensor.shape) for key, tensor in state.items()}}


def load_adapter(
    base_model: nn.Module, adapter_dir: str | Path, is_trainable: bool = False, registry: Registry | None = None
) -> Adapted:
    """Load a saved adapter onto ``base_model``; the config comes back as the method's own class.

    A base of another architecture or size is refused before loading, naming the layer that differs,
    and so is a Trainer checkpoint of a method that rewrites its base (:func:`check_not_a_training_state`).
    A full-precision base of a method that trains on a 4-bit one (QLoRA) is quantized first, as
    :func:`attach` does, so the model is the one that was trained.
    """
    check_argument("base_model", base_model, nn.Module, "the base model the adapter was trained on")
    check_argument("adapter_dir", adapter_dir, (str, os.PathLike), "a folder path (str or Path)")
    if isinstance(base_model, PeftModel):
        raise IncompatibleError(
            "base_model already holds an adapter (a PeftModel); pass the base model itself "
            "(model.get_base_model() after unload(), or from_pretrained again)"
        )
    registry = registry or get_registry()
    config = load_config(adapter_dir, registry)
    info = registry.method_for_config(config)
    if not any((Path(adapter_dir) / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise LowRankError(
            f"{adapter_dir} has an adapter_config.json but no adapter weights (adapter_model.safetensors); "
            "pass a complete adapter or checkpoint folder"
        )
    check_not_a_training_state(adapter_dir, info, config)
    check_adapter_fits(base_model, adapter_dir)
    on_meta = any(p.is_meta for p in base_model.parameters())
    if info.requires_quantized_base and not is_quantized(base_model):
        if on_meta:
            raise IncompatibleError(
                f"method '{info.name}' trained on a 4-bit base, which a meta-device skeleton cannot be quantized "
                "into; load the base with weights"
            )
        # as attach does: the adapter was trained on deq(NF4(W)), and on W it would be another model
        base_model = quantize_model(base_model, QuantizationSettings.from_config(config))
    if on_meta:
        with _adapters_stay_where_loaded():
            model = PeftModel.from_pretrained(base_model, str(adapter_dir), config=config, low_cpu_mem_usage=True)
    else:
        model = PeftModel.from_pretrained(base_model, str(adapter_dir), config=config, is_trainable=is_trainable)
    return Adapted(model=model, config=config, method=info, registry=registry)


@contextlib.contextmanager
def _adapters_stay_where_loaded() -> Iterator[None]:
    """Keep PEFT from moving freshly loaded adapter weights to their base layer's device.

    On a meta-device skeleton (a from-disk merge, :func:`~hf_lowrank_plugins.export.write_merged`
    with a ``source``), PEFT's ``low_cpu_mem_usage`` load assigns the adapter's real tensors and
    then moves them to the base layer's device, which turns them back into placeholders. PEFT has
    no option to skip that move, so it is suppressed for this load only.
    """
    layer_classes = {BaseTunerLayer, *_subclasses(BaseTunerLayer)}
    saved = {
        c: c.__dict__["_move_adapter_to_device_of_base_layer"]
        for c in layer_classes
        if "_move_adapter_to_device_of_base_layer" in c.__dict__
    }
    try:
        for cls in saved:
            setattr(cls, "_move_adapter_to_device_of_base_layer", lambda self, *args, **kwargs: None)  # noqa: B010
        yield
    finally:
        for cls, method in saved.items():
            setattr(cls, "_move_adapter_to_device_of_base_layer", method)  # noqa: B010


def _subclasses(cls: type) -> list[type]:
    direct: list[type] = cls.__subclasses__()
    return [sub for child in direct for sub in (child, *_subclasses(child))]
