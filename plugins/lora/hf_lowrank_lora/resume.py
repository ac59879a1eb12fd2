"""Checkpoints of a data-initialised residual method carry A0, B0, so resuming rebuilds W_res.

PiSSA and OLoRA can recompute their residual at attach; LoRA-GA's and CorDA's depend on data seen
at train begin, and the Trainer's checkpoints hold only the adapter's state dict. So each LoRA
layer gets two persistent PEFT ``BufferDict`` entries (``<method>_A0``, ``<method>_B0``, keyed by
adapter name: :class:`ResumeSlots`). PEFT counts everything on a tuner layer except
``base_layer`` as adapter state, so they are saved in every checkpoint and restored by
``PeftModel.load_adapter`` (what ``Trainer`` calls on resume). A ``load_state_dict`` post-hook on
the ``PeftModel`` then rebuilds ``W_res = W - s*B0@A0`` with the same fp32 arithmetic as the fresh
run (:func:`subtract_factors`), so the resumed run's weights are bit-identical.

The factors currently subtracted from W are the non-persistent ones of
:mod:`hf_lowrank_lora.residual`; the persistent copies say what the checkpoint wants. Exports
use the former and hide the latter (a portable adapter must not carry extra keys).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft import PeftModel
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora import LoraLayer
from peft.utils.other import transpose

from hf_lowrank_plugins.distributed import gathered, is_partitioned
from hf_lowrank_plugins.memory import release_replaced, weight_locations
from hf_lowrank_plugins.quantization import dequantized_4bit_weight, is_4bit_layer, requantize_4bit_weight

from . import residual
from .model import LoraModule, lora_layers


@torch.no_grad()
def subtract_factors(layer: LoraModule, A: torch.Tensor, B: torch.Tensor, scaling: float, sign: float = 1.0) -> None:
    """W <- W - sign * s * B @ A, computed in fp32 and rounded once to W's dtype.

    The Parameter object stays (the optimizer, DDP and DeepSpeed keep their references; a 4-bit weight,
    frozen and in no optimizer, is re-quantized into a new one, see below). On a CPU
    the weight usually lies in the memory-mapped checkpoint, where writing in place copies every
    page on first touch (1.6-1.8x the time of a new tensor plus handing the old pages back, on SmolLM2-135M): there the weight
    gets a new tensor and the old pages are handed back (:func:`release_replaced`). Elsewhere, and
    for ZeRO-3's gathered weights (DeepSpeed partitions what ``.data`` holds), it is written in place.
    A 4-bit base holds ``Q(deq(W) - sign * s * B @ A)`` afterwards (QLoRA-GA's residual: the base was
    quantized before the data the factors come from was seen).
    """
    base = layer.get_base_layer()
    weight = base.weight
    if is_4bit_layer(base):
        product = (B.float() @ A.float()).mul_(sign * scaling)
        requantize_4bit_weight(base, dequantized_4bit_weight(base).float() - product)
        return
    delta = transpose((B.float() @ A.float()).mul_(sign * scaling), getattr(layer, "fan_in_fan_out", False))
    if weight.device.type == "cpu" and not is_partitioned(weight):
        locations = weight_locations([base])
        weight.data = (weight.data.float() - delta).to(weight.dtype)
        release_replaced(locations, trim=False)  # the only temporary, delta, is reused layer to layer
    elif weight.dtype == torch.float32:
        weight.data.sub_(delta)  # the same fp32 subtraction, without a second m x n buffer
    else:
        weight.data.copy_((weight.data.float() - delta).to(weight.dtype))


class ResumeSlots:
    """The checkpoint slots of one method's initial factors (``<method>_A0``/``<method>_B0``), and the
    load hook that rebases W on them. Plain data, so models holding its hook stay deep-copyable."""

    def __init__(self, method: str) -> None:
        self.saved_a, self.saved_b = f"{method}_A0", f"{method}_B0"
        self.hooked = f"_hf_lowrank_{method}_load_hook"

    def add(self, model: PeftModel, adapter: str = "default") -> None:
        """Give every LoRA layer zero persistent A0/B0 slots and hook ``model`` to rebase W after loads."""
        for layer in lora_layers(model, adapter).values():
            A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            for attr, like in ((self.saved_a, A), (self.saved_b, B)):
                if not hasattr(layer, attr) or not isinstance(getattr(layer, attr), BufferDict):
                    setattr(layer, attr, BufferDict(persistent=True))
                getattr(layer, attr)[adapter] = torch.zeros_like(like, requires_grad=False)
        if not getattr(model, self.hooked, False):
            model.register_load_state_dict_post_hook(self.rebase_after_load)
            setattr(model, self.hooked, True)

    @torch.no_grad()
    def record(self, layer: LoraModule, adapter: str, A: torch.Tensor, B: torch.Tensor) -> None:
        """Put the applied A0, B0 into the layer's checkpoint slots."""
        getattr(layer, self.saved_a)[adapter].copy_(A)
        getattr(layer, self.saved_b)[adapter].copy_(B)

    def rebase_after_load(self, model: torch.nn.Module, incompatible_keys: object) -> None:
        """``load_state_dict`` post-hook: make W hold W - s*B0@A0 for the A0, B0 just loaded.

        A layer whose base weight came with the checkpoint (PEFT saves a targeted ``lm_head`` or
        embedding whole, ``save_embedding_layers``) holds W_res already: subtracting again would leave
        W - 2 s B0 A0, so only the factors are registered.
        """
        missing = set(getattr(incompatible_keys, "missing_keys", ()))
        rebased = False
        for adapter in getattr(model, "peft_config", {}):
            for name, layer in lora_layers(model, adapter).items():
                slots = getattr(layer, self.saved_a, None), getattr(layer, self.saved_b, None)
                if not all(isinstance(s, BufferDict) and adapter in s for s in slots):
                    continue
                a0, b0 = slots[0][adapter], slots[1][adapter]  # type: ignore[index]  # both slots exist once the factors were stored
                applied_a = getattr(layer, residual.INITIAL_A + adapter, None)
                applied_b = getattr(layer, residual.INITIAL_B + adapter, None)
                applied = (applied_a, applied_b) if applied_a is not None and applied_b is not None else None
                if applied is not None and torch.equal(applied[0], a0) and torch.equal(applied[1], b0):
                    continue  # already the base this checkpoint was trained on
                if applied is None and not b0.any():
                    continue  # checkpoint written before the data init: nothing subtracted on either side
                scaling = layer.scaling[adapter]
                if f"{name}.base_layer.weight" in missing:  # else the checkpoint's W_res came with it
                    # under ZeRO-3 W is a placeholder here (DeepSpeed loads the module state before its
                    # partitions); every rank gathers it, rebases it alike, and rank 0's result is kept
                    with gathered([layer.get_base_layer().weight], modifier_rank=0):
                        if applied is not None:  # another init was applied: restore W first (rare; not bit-exact)
                            subtract_factors(layer, applied[0], applied[1], scaling, sign=-1.0)
                        subtract_factors(layer, a0, b0, scaling)
                # residual.store_initial_factors stores the layer's *current* A, B; after a load those are
                # the trained ones, so register the loaded initial factors under its names directly
                layer.register_buffer(residual.INITIAL_A + adapter, a0.detach().clone(), persistent=False)
                layer.register_buffer(residual.INITIAL_B + adapter, b0.detach().clone(), persistent=False)
                rebased = True
        if rebased and isinstance(model, PeftModel):
            residual.mark_residual_base(model)

    @contextlib.contextmanager
    def hidden(self, model: torch.nn.Module) -> Iterator[None]:
        """Inside: the A0/B0 checkpoint slots are non-persistent, so state dicts (exports) leave them out."""
        touched = []
        for layer in model.modules():
            for attr in (self.saved_a, self.saved_b):
                slot = getattr(layer, attr, None) if isinstance(layer, LoraLayer) else None
                if isinstance(slot, BufferDict):
                    names = set(slot._buffers) - slot._non_persistent_buffers_set
                    slot._non_persistent_buffers_set |= names
                    touched.append((slot, names))
        try:
            yield
        finally:
            for slot, names in touched:
                slot._non_persistent_buffers_set -= names
