"""Attach DoRA with PEFT, and run it fast at inference (cached norms or a merged adapter)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from peft import LoraConfig, PeftModel
from peft.helpers import DoraCaching
from peft.tuners.lora import variants as peft_variants
from peft.tuners.lora.dora import DoraLinearLayer
from torch import nn

from hf_lowrank_lora import attach_lora
from hf_lowrank_plugins import ConfigError, IncompatibleError, is_quantized
from hf_lowrank_plugins.quantization import prepare_for_training

from .lowrank_norm import LowRankDoraLinearLayer, use_low_rank_norms


def attach_dora(model: nn.Module, config: LoraConfig) -> PeftModel:
    """Wrap ``model`` with PEFT's DoRA layers (``use_dora=True``), after LoRA's target and rank checks.

    A model that arrives already in 4-bit (loaded by the user with a ``BitsAndBytesConfig``) gets the
    same k-bit preparation as ``load_in_4bit=True``, so it trains on the exact
    dequantize-then-matmul path.
    """
    if not getattr(config, "use_dora", False):
        raise ConfigError("DoRA needs use_dora=True in its config; for plain LoRA use method 'lora'")
    if is_quantized(model):
        model = prepare_for_training(model)
    with _low_rank_magnitude_init():
        adapted = attach_lora(model, config)
    use_low_rank_norms(adapted)  # same maths, no dense W + s*B@A per forward (see lowrank_norm)
    return adapted


@contextmanager
def _low_rank_magnitude_init() -> Iterator[None]:
    """For this attach only, PEFT's DoRA variant creates our magnitude layer, whose ``update_layer``
    takes the initial norms from low-rank pieces instead of each layer's dense ``W + s B A``
    (:meth:`LowRankDoraLinearLayer.update_layer`). PEFT names the class in its variant module and has
    no other way to choose it; the rest of its initialisation is unchanged."""
    original = peft_variants.DoraLinearLayer
    setattr(peft_variants, "DoraLinearLayer", LowRankDoraLinearLayer)  # noqa: B010
    try:
        yield
    finally:
        setattr(peft_variants, "DoraLinearLayer", original)  # noqa: B010


def clear_dora_cache(model: nn.Module) -> int:
    """Drop every cached DoRA weight norm in ``model``; returns how many layers were cleared.

    Needed whenever adapter weights change while the model stays in eval mode (PEFT only clears
    its cache when a layer switches to training mode).
    """
    layers = [m for m in model.modules() if isinstance(m, DoraLinearLayer)]
    for layer in layers:
        layer._cache_clear()
    return len(layers)


def cache_for_inference(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Put ``model`` in eval mode and switch PEFT's DoRA caching on (or off) for good.

    DoRA's forward recomputes the row norms of ``W + s*B@A`` on every call (from ``W A^T``, see
    ``lowrank_norm``); with caching they are computed once per layer and reused. PEFT's switch is
    process-wide and has no effect in training mode (the Trainer's ``model.train()`` clears the
    cache). Prefer :func:`fast_inference`, which restores the previous state when it ends.
    """
    clear_dora_cache(model)
    DoraCaching()(enabled=enabled)
    return model.eval() if enabled else model


@contextmanager
def fast_inference(model: nn.Module, mode: Literal["cache", "merge"] = "cache") -> Iterator[nn.Module]:
    """Run a DoRA model in eval mode without re-deriving its weights on every forward.

    ``mode="cache"``: PEFT's ``DoraCaching`` (memory for one norm vector per layer);
    works on 4-bit bases. ``mode="merge"``: fold the adapter into the base weights
    (``merge_adapter``) and unfold it on exit; as fast as the plain base, full precision only.
    The model's train/eval mode is restored on exit and caches are dropped; unmerging subtracts the
    update back, so base weights come back equal up to float rounding, not bit for bit.
    """
    if mode not in ("cache", "merge"):
        raise ConfigError(f"mode must be 'cache' or 'merge', got {mode!r}")
    if mode == "merge" and is_quantized(model):
        raise IncompatibleError(
            "merging DoRA into a 4-bit base would round the merged weights to 4 bits; use mode='cache', "
            "or export a merged full-precision checkpoint with adapted.export(dir, merge=True)"
        )
    was_training = model.training
    model.eval()
    clear_dora_cache(model)
    try:
        if mode == "merge":
            model.merge_adapter(safe_merge=True)  # type: ignore[operator]  # nn.Module.__getattr__ types a transformers/PEFT attribute as Tensor | Module
            try:
                yield model
            finally:
                model.unmerge_adapter()  # type: ignore[operator]  # nn.Module.__getattr__ types a transformers/PEFT attribute as Tensor | Module
        else:
            with DoraCaching(enabled=True):
                yield model
    finally:
        clear_dora_cache(model)
        model.train(was_training)
