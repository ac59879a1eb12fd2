"""Attach SALOR on PEFT's LoRA layers: prune the frozen base, initialise the repair, mask the factors.

For every target weight W (out x in) with LoRA scaling s and rank r::

    M      = magnitude mask of W           (per layer, global, or 2:4; fixed for good)
    W_s    = M * W                         (the frozen sparse base)
    E      = W - W_s                       (what pruning removed)
    E_r    = U_r S_r V_r^T                 (best rank-r approximation of E, Eckart-Young)
    B A    = E_r / s,  B = U_r sqrt(S_r) / sqrt(s),  A = sqrt(S_r) V_r^T / sqrt(s)

so the model at step 0 computes ``W_s + s*B@A = W_s + E_r``: the pruned model plus the best rank-r
repair. Only A and B train; W_s never changes, so its zeros stay zeros. With a sparse adapter
(``sparsity_target`` adapter/both) A and B carry magnitude masks (non-persistent buffers on the LoRA
layer) that are enforced twice: a gradient hook zeroes masked gradients (any training loop), and an
optimizer step hook (installed through ``wrap_optimizer``) re-zeroes masked weights after every step
(momentum and weight decay cannot revive them) and advances a cubic sparsity schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial

import torch
from peft import PeftModel
from torch import nn

from hf_lowrank_lora import LoraModule, attach_lora, lora_layers, residual
from hf_lowrank_plugins import QuantizationSettings
from hf_lowrank_plugins.quantization import quantize_model, requantize_under_adapter

from .config import SalorConfig
from .prune import base_masks, magnitude_mask

#: Non-persistent buffer names of the adapter masks on a LoRA layer (suffixed by the adapter name).
MASK_A, MASK_B = "salor_mask_A_", "salor_mask_B_"


def svd_repair(
    residual: torch.Tensor, rank: int, scaling: float, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A, B) with ``scaling * B @ A`` equal to the rank-``rank`` truncated SVD of ``residual``.

    The singular values are split evenly (sqrt on each side, as PiSSA does) so A and B have the
    same scale and train at similar speeds; computed in fp32 whatever the weight dtype. With
    ``niter`` the SVD is randomized (``torch.svd_lowrank``, ``rank + 10`` probe vectors, ``niter``
    subspace iterations; it draws from the global RNG, seed it around the call): tens of times
    faster, and within a fraction of a percent of the optimal error (measured in the README).
    """
    if niter is None:
        U, S, Vh = torch.linalg.svd(residual.float(), full_matrices=False)
    else:
        U, S, V = torch.svd_lowrank(residual.float(), q=min(rank + 10, *residual.shape), niter=niter)
        Vh = V.t()
    root = S[:rank].sqrt() / math.sqrt(abs(scaling))
    A = root[:, None] * Vh[:rank]
    B = U[:, :rank] * root[None, :] * (1.0 if scaling >= 0 else -1.0)
    return A, B


def truncation_error(residual: torch.Tensor, rank: int) -> tuple[float, float, float]:
    """(||E - E_r||_F^2, ||E||_F^2, Eckart-Young bound (1 - r/min(d,k)) ||E||_F^2) for ``residual`` E."""
    S = torch.linalg.svdvals(residual.double())
    total = float((S**2).sum())
    tail = float((S[rank:] ** 2).sum())
    return tail, total, (1 - rank / min(residual.shape)) * total


def _oriented(layer: LoraModule) -> torch.Tensor:
    """The layer's base weight as (out x in): a transposed view for ``fan_in_fan_out`` (``Conv1D``) layers."""
    weight = layer.base_layer.weight
    return weight.t() if getattr(layer, "fan_in_fan_out", False) else weight


def attach_salor(
    model: nn.Module,
    config: SalorConfig,
    quantization: QuantizationSettings | None = None,
    adapter: str = "default",
) -> PeftModel:
    """Attach SALOR to ``model`` (see the module docstring for the maths) and return the PeftModel.

    ``quantization`` (from ``attach(..., load_in_4bit=True)``) or ``config.quantize_base`` stores the
    pruned base in NF4 after the SVD has seen the full-precision weights.
    """
    residual.check_clean_base(
        model,
        "SALOR",
        rewrite="prunes the base weights",
        quantized_reason="SALOR ranks full-precision weight magnitudes and takes the SVD of the pruning residual, but "
        "the base is already 4-bit. Load the model in 16/32-bit and pass load_in_4bit=True (or quantize_base=True): "
        "pruning and SVD run first, then the sparse base is quantized to NF4.",
    )
    peft_model = attach_lora(model, config)  # PEFT's layers, target and rank checks
    layers = lora_layers(peft_model, adapter)
    niter = config.svd_niter if config.svd == "fast" else None
    if config.prunes_base:
        # Masks and SVD work on W in LoRA orientation (out x in): a view of GPT-2's transposed Conv1D
        # weights, so 2:4 groups run along the inputs and B @ A has W's shape for every layer type.
        weights = {n: _oriented(layer) for n, layer in layers.items()}
        # masks come one layer at a time (a global threshold is found first, from histograms)
        masks = base_masks(weights, config.sparsity, config.sparsity_pattern)
        # fork_rng: a seeded randomized SVD gives the same factors on every attach (resume, DDP ranks)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.svd_seed)
            for name, mask in masks:
                layer, weight = layers[name], weights[name]
                dense = weight.detach().float()
                # torch.where, not weight * mask: a product leaves -0.0 where a negative weight was cut
                pruned = torch.where(mask, dense, torch.zeros((), dtype=dense.dtype))
                if config.effective_repair_init == "svd":
                    A, B = svd_repair(dense - pruned, layer.r[adapter], layer.scaling[adapter], niter=niter)
                    layer.lora_A[adapter].weight.copy_(A)
                    layer.lora_B[adapter].weight.copy_(B)
                weight.copy_(pruned)
    if quantization is None and config.quantize_base:
        quantization = QuantizationSettings.from_config(config)
    if quantization is not None:
        peft_model = _quantize_sparse_base(peft_model, quantization)
    if config.sparse_adapter:
        init_adapter_masks(peft_model, config, adapter)
    return peft_model


def _quantize_sparse_base(model: PeftModel, settings: QuantizationSettings) -> PeftModel:
    """NF4 for the pruned base, with the same (full-precision) A, B put back on top.

    NF4's code book contains an exact 0, so pruned entries dequantize to exactly 0 and the sparsity
    pattern survives; the kept weights carry the usual NF4 rounding.
    """
    return requantize_under_adapter(model, partial(quantize_model, settings=settings))


# --------------------------------------------------------------------------- adapter sparsity


def _factor_mask(weight: torch.Tensor, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """Magnitude mask of one factor; a seeded random one if the factor is all zeros (B of plain LoRA)."""
    if bool((weight != 0).any()):
        return magnitude_mask(weight, sparsity)
    scores = torch.rand(weight.shape, generator=generator).to(weight.device)
    return magnitude_mask(scores, sparsity)


def _mask_grad(layer: LoraModule, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        # read the buffer at call time: the schedule replaces it as sparsity ramps up
        return grad * getattr(layer, key).to(grad.dtype)

    return hook


def init_adapter_masks(model: nn.Module, config: SalorConfig, adapter: str = "default") -> None:
    """Give every LoRA layer's A and B a mask (buffers ``salor_mask_A_<adapter>``/``..._B_...``), zero
    the masked entries and register gradient hooks that keep them zero.

    Static schedule: masks at ``adapter_sparsity`` now. Cubic schedule: masks start all-ones and
    :class:`AdapterMaskEnforcer` tightens them step by step.
    """
    generator = torch.Generator().manual_seed(config.mask_seed)
    sparsity = config.adapter_sparsity if config.adapter_schedule == "static" else 0.0
    for layer in lora_layers(model, adapter).values():
        for key, linear in ((MASK_A, layer.lora_A[adapter]), (MASK_B, layer.lora_B[adapter])):
            mask = _factor_mask(linear.weight.detach(), sparsity, generator)
            layer.register_buffer(key + adapter, mask, persistent=False)
            linear.weight.register_hook(_mask_grad(layer, key + adapter))
    apply_adapter_masks(model, adapter)


def iter_adapter_masks(model: nn.Module, adapter: str = "default") -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
    """(name, factor weight, mask) for every masked A and B of ``adapter`` in ``model``."""
    for name, layer in lora_layers(model, adapter).items():
        for key, part in ((MASK_A, "lora_A"), (MASK_B, "lora_B")):
            mask = getattr(layer, key + adapter, None)
            if mask is not None:
                yield f"{name}.{part}", getattr(layer, part)[adapter].weight, mask


def apply_adapter_masks(model: nn.Module, adapter: str = "default") -> int:
    """Zero every masked entry of A and B in place; returns the number of masked factors."""
    count = 0
    with torch.no_grad():
        for _, weight, mask in iter_adapter_masks(model, adapter):
            weight.masked_fill_(~mask, 0.0)
            count += 1
    return count


def cubic_sparsity(step: int, final: float, steps: int) -> float:
    """Zhu & Gupta (2017) gradual pruning: ``final * (1 - (1 - t/T)^3)``, constant after ``T`` steps."""
    if steps <= 0:
        return final
    t = min(step, steps) / steps
    return final * (1 - (1 - t) ** 3)


class AdapterMaskEnforcer:
    """Optimizer hooks that keep masked A, B entries at zero and advance the adapter schedule.

    Hung on the optimizer by the plugin's ``on_train_begin`` with ``register_step_post_hook`` (after
    every optimizer step) and ``register_load_state_dict_post_hook`` (a state loaded later: the step
    count is taken from the optimizer state, and the masks from the zeros of the restored weights).
    """

    def __init__(self, model: nn.Module, config: SalorConfig, adapter: str = "default") -> None:
        self.model, self.config, self.adapter = model, config, adapter
        self.step = 0

    def target_sparsity(self) -> float:
        """The adapter sparsity the schedule asks for after ``self.step`` optimizer steps."""
        if self.config.adapter_schedule == "static":
            return self.config.adapter_sparsity
        return cubic_sparsity(self.step, self.config.adapter_sparsity, self.config.adapter_schedule_steps)

    def after_step(self, optimizer: torch.optim.Optimizer, args: object = None, kwargs: object = None) -> None:
        """Count the step, tighten the masks while the schedule ramps, then zero masked entries."""
        self.step += 1
        ramping = self.config.adapter_schedule == "cubic" and self.step <= self.config.adapter_schedule_steps
        with torch.no_grad():
            for _, weight, mask in iter_adapter_masks(self.model, self.adapter):
                if ramping:
                    # rank only the surviving entries, so a pruned entry never comes back
                    kept = magnitude_mask(weight * mask, self.target_sparsity()) & mask
                    mask.copy_(kept)
                weight.masked_fill_(~mask, 0.0)

    def after_load(self, optimizer: torch.optim.Optimizer) -> None:
        """On resume: recover the step count from the optimizer state and the masks from the weights."""
        steps = [int(s["step"]) for s in optimizer.state.values() if isinstance(s, dict) and "step" in s]
        if steps:
            self.step = max(steps)
        if self.config.adapter_schedule == "cubic" and self.step > 0:
            with torch.no_grad():
                for _, weight, mask in iter_adapter_masks(self.model, self.adapter):
                    mask.copy_(mask & (weight != 0))

    def install(self, optimizer: torch.optim.Optimizer) -> AdapterMaskEnforcer:
        """Register both hooks on ``optimizer``; returns self."""
        optimizer.register_step_post_hook(self.after_step)
        optimizer.register_load_state_dict_post_hook(self.after_load)
        return self

    @classmethod
    def attach(
        cls, model: nn.Module, config: SalorConfig, optimizer: torch.optim.Optimizer, resumed: bool = False
    ) -> AdapterMaskEnforcer:
        """The enforcer of ``optimizer``, installed once however often training begins on it.

        The Trainer restores a checkpoint's optimizer state before training begins, so on
        ``resumed`` the state is read here rather than by the load hook.
        """
        enforcer = getattr(optimizer, "_salor_enforcer", None)
        if enforcer is None:
            enforcer = cls(model, config).install(optimizer)
            optimizer._salor_enforcer = enforcer  # type: ignore[attr-defined]  # one enforcer per optimizer, found again on a second train()
        if resumed:
            enforcer.after_load(optimizer)
        return enforcer


# --------------------------------------------------------------------------- reporting


def sparsity_report(model: nn.Module, adapter: str = "default") -> dict[str, dict[str, float]]:
    """Per LoRA layer: fraction of zeros in the base weight, in A and in B (0.0 for a 4-bit base)."""
    out = {}
    for name, layer in lora_layers(model, adapter).items():
        w = layer.base_layer.weight
        base = float((w == 0).float().mean()) if w.is_floating_point() else 0.0
        out[name] = {
            "base": base,
            "A": float((layer.lora_A[adapter].weight == 0).float().mean()),
            "B": float((layer.lora_B[adapter].weight == 0).float().mean()),
        }
    return out
