"""GaLore Adafactor: Adafactor's factored second moment kept on the low-rank projected gradient.

For a target weight W (m x n) the projected gradient R (m x r, r x n or r x r) gets Adafactor's
update exactly as ``transformers.optimization.Adafactor`` computes it for a full gradient (row and
column second-moment factors, RMS clipping at ``clip_threshold``, optional first moment with
``beta1``, relative step and parameter scale when enabled, where the parameter RMS is that of the
full W); that update is projected back, multiplied by ``scale`` and applied after weight decay.
This is galore-torch 1.0's ``GaLoreAdafactor`` arithmetic; other groups are plain transformers
Adafactor. The factored moments of a right-projected m x r gradient take m + r floats instead of
Adafactor's m + n, and the optional first moment m*r instead of m*n.

Built by hand because neither parent does it whole: transformers' Adafactor has no projection, and
galore-torch's keeps projector objects in the optimizer state (checkpoints that
``torch.load(weights_only=True)`` refuses) and has no layer-wise mode with gradient accumulation.
The per-tensor arithmetic is transformers' own (its static helpers are called, not copied), so the
two cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import torch
from transformers.optimization import Adafactor

from .optimizer import GaLoreOptimizer
from .projector import project_back, projection_side

_HALF = (torch.float16, torch.bfloat16)


class GaLoreAdafactor(GaLoreOptimizer):
    """Adafactor with GaLore projection for groups marked ``galore=True``.

    Args:
        params: parameters or groups. Per-group keys: the Adafactor hyperparameters below,
            ``galore``, ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``.
        lr, eps, clip_threshold, decay_rate, beta1, weight_decay, scale_parameter, relative_step,
            warmup_init: as ``transformers.optimization.Adafactor`` (same defaults, same checks).
        rank, update_proj_gap, scale, proj_type: GaLore defaults for ``galore`` groups.
        layerwise: project target gradients in post-accumulate-grad hooks (see ``optimizer.py``).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        layerwise: bool = False,
    ) -> None:
        if lr is not None and relative_step:
            raise ValueError("Adafactor: a manual lr needs relative_step=False (relative_step computes its own lr)")
        if warmup_init and not relative_step:
            raise ValueError("Adafactor: warmup_init=True needs relative_step=True")
        defaults = dict(
            lr=lr,
            eps=tuple(eps),
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            beta1=beta1,
            weight_decay=weight_decay,
            scale_parameter=scale_parameter,
            relative_step=relative_step,
            warmup_init=warmup_init,
            galore=False,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
        )
        super().__init__(params, defaults, layerwise)

    def _projection_input(self, p: torch.Tensor) -> torch.Tensor:
        """A 16-bit gradient is projected in fp32 (galore-torch's Adafactor computes in fp32), so the
        projector and the factored moments are fp32, in layer-wise mode too."""
        grad = cast(torch.Tensor, p.grad)
        return grad.float() if grad.dtype in _HALF else grad

    def _update_param(self, p: torch.Tensor, group: dict) -> None:
        """Adafactor on the projected gradient for target weights, plain Adafactor for the rest."""
        if not group["galore"] and p.grad is None:
            return  # like transformers' Adafactor: no state entry for a parameter without a gradient
        state = self.state[p]
        if group["galore"]:
            side = projection_side(p.shape, group["proj_type"])
            grad = self._low_rank_grad(p, group, state, side)
        else:
            grad = p.grad
        if grad is None:
            return  # a target weight without a gradient this step: its state stays as it was
        if grad.dtype in _HALF:
            grad = grad.float()
        if grad.is_sparse:
            raise RuntimeError("Adafactor does not support sparse gradients.")
        param = p.float() if p.dtype in _HALF else p
        update, lr = self._update(grad, param, state, group)
        if group["galore"]:
            update = project_back(update, state, side, group["scale"])
        if group["weight_decay"] != 0:
            param.add_(param, alpha=-group["weight_decay"] * lr)
        param.add_(-update)
        if param is not p:
            p.copy_(param)

    @staticmethod
    def _update(grad: torch.Tensor, param: torch.Tensor, state: dict, group: dict) -> tuple[torch.Tensor, float]:
        """Adafactor's update for ``grad`` (full or projected) and the step's lr; updates ``state``.

        ``param`` is the full fp32 weight: its RMS sets the parameter scale, as in galore-torch.
        """
        factored, use_first_moment = Adafactor._get_options(group, grad.shape)
        if "RMS" not in state:  # not len(state) == 0: a GaLore weight already holds step and projector
            state["step"] = 0
            if use_first_moment:
                state["exp_avg"] = torch.zeros_like(grad)
            if factored:
                state["exp_avg_sq_row"] = torch.zeros(grad.shape[:-1]).to(grad)
                state["exp_avg_sq_col"] = torch.zeros(grad.shape[:-2] + grad.shape[-1:]).to(grad)
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
            state["RMS"] = 0
        state["step"] += 1
        state["RMS"] = Adafactor._rms(param)
        lr = Adafactor._get_lr(group, state)
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        update = grad**2 + group["eps"][0]
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            update = Adafactor._approx_sq_grad(row, col).mul_(grad)
        else:
            exp_avg_sq = state["exp_avg_sq"]
            exp_avg_sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = exp_avg_sq.rsqrt().mul_(grad)
        update.div_((Adafactor._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if use_first_moment:
            exp_avg = state["exp_avg"]
            exp_avg.mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
            update = exp_avg
        return update, lr
