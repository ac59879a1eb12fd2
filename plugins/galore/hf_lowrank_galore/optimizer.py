"""GaLore AdamW: Adam moments of target weights kept in a low-rank gradient subspace.

:class:`GaLoreOptimizer` holds what every GaLore optimizer shares (projector refresh, projection,
layer-wise hooks); :class:`GaLoreAdamW` here and ``adafactor.GaLoreAdafactor`` add their moments.

One ``torch.optim.Optimizer`` holds every trainable parameter. Groups flagged ``galore=True``
contain 2-D target weights: their gradient G is projected to R (rank r) with a projector refreshed
from an SVD of G at step 0 and every ``update_proj_gap`` steps; Adam runs on R; the normalised
update is projected back, multiplied by ``scale`` and applied; decoupled weight decay is applied at
full rank. The arithmetic of that path is galore-torch 1.0's ``GaLoreAdamW`` exactly (bias
correction folded into the step size, ``eps`` added to ``sqrt(v)``, decay applied after the
update), so both give the same weights for the same gradients. Other groups are plain
``torch.optim.AdamW`` (what the Trainer builds by default).

Everything in ``optimizer.state`` is a tensor or an int, so checkpoints load with
``torch.load(weights_only=True)`` and ``state_dict``/``load_state_dict`` round-trip exactly.

Variants:

* ``optim_bits=8``: Adam moments in bitsandbytes' blockwise 8-bit format, updated by
  bitsandbytes' own ``optimizer_update_8bit_blockwise`` kernel (``bnb.optim.AdamW8bit`` semantics,
  also on CPU). For target weights the kernel runs on the low-rank gradient.
* DeepSpeed ZeRO-1/2/3: DeepSpeed hands each group to the optimizer as one flat fp32 slice per
  rank. Once :meth:`GaLoreOptimizer.bind_zero_partitions` has the layout (the core's callback
  gives it at train begin), a ``galore`` group steps weight by weight: the whole weight and its
  gradient are gathered (exactly: each element comes from the one rank that holds it), the ranks
  that hold part of it run the very update above on the whole matrix, and each keeps its own
  part. Memory beyond ZeRO's stays bounded by two copies of the largest weight. The low-rank
  moments live on every rank holding part of the weight: about one rank per weight under
  ZeRO-1/2, every rank under ZeRO-3 (which splits each weight across all of them).
* ``layerwise=True``: each target weight's gradient is projected in a post-accumulate-grad hook as
  soon as autograd has finished it, added to a low-rank accumulator and freed, so full gradients of
  target weights never coexist. The Adam update itself runs in ``step()``. This works with gradient
  accumulation: the accumulator sums the projected micro-batch gradients (projection is linear).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch

from hf_lowrank_plugins import LowRankError
from hf_lowrank_plugins.distributed import ZeroPartition
from hf_lowrank_plugins.optim import own_layerwise_hook

from .projector import compute_projection, project, project_back, projection_side

#: bitsandbytes' blockwise quantisation block size (fixed in its kernels).
_BNB_BLOCKSIZE = 256
#: Accumulator for layer-wise mode; never present when a checkpoint is written (``step`` pops it).
_ACCUM_KEY = "lowrank_grad"
#: Under ZeRO, the state of a flat parameter's whole weights, by their index in its group.
_ZERO_WEIGHTS_KEY = "galore_weights"


def _import_bnb_functional() -> Any:
    """``bitsandbytes.functional``, or an error saying how to get it."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as exc:  # optional dependency
        from hf_lowrank_plugins import ConfigError

        raise ConfigError(
            "optimizer='adamw8bit' needs bitsandbytes; install it with `pip install hf-lowrank-galore[8bit]` "
            "or use optimizer='adamw'"
        ) from exc
    return bnb_functional


class GaLoreOptimizer(torch.optim.Optimizer):
    """What every GaLore optimizer shares: projector refresh, projection and layer-wise mode.

    Subclasses implement ``step()`` with their own moment arithmetic on the low-rank gradient that
    :meth:`_low_rank_grad` returns. Param groups flagged ``galore=True`` carry ``rank``,
    ``update_proj_gap``, ``scale`` and ``proj_type``.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], defaults: dict, layerwise: bool) -> None:
        super().__init__(params, defaults)
        self.layerwise = layerwise
        self._hooks: list[Any] = []
        self._zero_partitions: dict[int, ZeroPartition] = {}
        for group in self.param_groups:
            if group["galore"]:
                for p in group["params"]:
                    projection_side(p.shape, group["proj_type"])  # validates 2-D and proj_type early
        self._own_layerwise_hooks()

    # ------------------------------------------------------------------ layer-wise mode

    def _own_layerwise_hooks(self) -> None:
        """One post-accumulate-grad hook per target weight in layer-wise mode (see module docs), none
        otherwise; either way the hook an earlier optimizer left on the weight is removed."""
        for group in self.param_groups:
            if not group["galore"]:
                continue
            for p in group["params"]:
                handle = own_layerwise_hook(p, self._make_hook(group) if self.layerwise and p.requires_grad else None)
                if handle is not None:
                    self._hooks.append(handle)

    def _make_hook(self, group: dict) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            self._accumulate_projected(p, group)

        return hook

    @torch.no_grad()
    def _accumulate_projected(self, p: torch.Tensor, group: dict) -> None:
        """Project ``p.grad`` into the accumulator and free it (layer-wise mode)."""
        if p.grad is None:
            return
        state = self.state[p]
        side = projection_side(p.shape, group["proj_type"])
        grad = self._projection_input(p)
        if _ACCUM_KEY not in state:
            # First micro-batch of this optimizer step: refresh the projector here, because the
            # full accumulated gradient will never exist in this mode. With gradient accumulation
            # the SVD therefore sees the first micro-batch only (documented in the README).
            self._maybe_refresh(p, grad, state, group, side)
            state[_ACCUM_KEY] = project(grad, state, side)
        else:
            state[_ACCUM_KEY].add_(project(grad, state, side))
        p.grad = None  # why layer-wise exists: the full gradient is gone before the next one is made

    def remove_hooks(self) -> None:
        """Detach the layer-wise hooks (e.g. before building another optimizer for the same model)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @staticmethod
    def _maybe_refresh(p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, side: str) -> None:
        """Refresh the projector at step 0 and every ``update_proj_gap`` steps (galore-torch's rule)."""
        state.setdefault("step", 0)
        if "proj" not in state or state["step"] % group["update_proj_gap"] == 0:
            state.update(compute_projection(grad, group["rank"], side))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step over all groups; ``closure`` re-evaluates the loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group["params"]:  # ZeRO-3 fills one group at a time
                continue
            if group["galore"] and group["params"][0].dim() == 1:
                self._step_partitioned(group)
                continue
            for p in group["params"]:
                self._update_param(p, group)
        return loss

    # ------------------------------------------------------------------ DeepSpeed ZeRO

    def bind_zero_partitions(self, partitions: dict[int, ZeroPartition]) -> None:
        """Learn how DeepSpeed ZeRO laid the ``galore`` groups' weights into flat slices (see module docs)."""
        self._zero_partitions = partitions

    def _step_partitioned(self, group: dict) -> None:
        """Update a ``galore`` group that DeepSpeed replaced by this rank's flat slice, one whole weight at a time.

        Running :meth:`_update_param` on the gathered whole weight keeps the arithmetic that of a
        single process. Collective: every rank walks every weight, holding a part of it or not.
        """
        flat = group["params"][0]
        partition = self._zero_partitions.get(id(flat))
        if partition is None:
            raise LowRankError(
                "GaLore's target weights reached the optimizer as a flat slice, but nothing told it their layout; "
                "under DeepSpeed ZeRO train through Trainer(..., **adapted.trainer_kwargs()), whose callback does"
            )
        if flat.grad is None:
            return
        weight_states = self.state[flat].setdefault(_ZERO_WEIGHTS_KEY, {})
        for weight in partition.weights:
            whole, grad = partition.gather(weight, flat.detach(), flat.grad)
            if not weight.length:  # none of it is on this rank
                continue
            whole.grad = grad
            self.state[whole] = weight_states.setdefault(weight.index, {})
            try:
                self._update_param(whole, group)
            finally:
                del self.state[whole]
            partition.write_back(weight, whole, flat.detach())

    def _update_param(self, p: torch.Tensor, group: dict) -> None:
        """Update one parameter of ``group`` (GaLore-projected when ``group["galore"]``)."""
        raise NotImplementedError

    def _projection_input(self, p: torch.Tensor) -> torch.Tensor:
        """``p.grad`` as it is projected: in its own dtype here; a subclass may widen it (Adafactor
        projects a 16-bit gradient in fp32, as galore-torch does). The projector takes this dtype, so
        the hooks of layer-wise mode and :meth:`_low_rank_grad` must agree on it."""
        return cast(torch.Tensor, p.grad)

    def _low_rank_grad(self, p: torch.Tensor, group: dict, state: dict, side: str) -> torch.Tensor | None:
        """This step's projected gradient of target weight ``p`` (refreshing the projector when due).

        Layer-wise mode hands over (and clears) the accumulator its hooks filled; otherwise
        ``p.grad`` (:meth:`_projection_input`) is projected. None when there is no gradient.
        """
        if self.layerwise and _ACCUM_KEY in state:
            return state.pop(_ACCUM_KEY)
        if p.grad is None:
            return None
        grad = self._projection_input(p)
        self._maybe_refresh(p, grad, state, group, side)
        return project(grad, state, side)

    # ------------------------------------------------------------------ checkpoints

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict`` with every state tensor in the dtype it was saved in.

        ``torch.optim.Optimizer.load_state_dict`` casts each floating-point parameter's state to the
        parameter's dtype. Ours is not always in it: 8-bit moments are uint8 with fp32 block scales,
        and Adafactor keeps the projector and moments of a 16-bit weight in fp32. Cast, a resumed
        run would differ from the uninterrupted one, or fail at its first step; the saved tensors
        are put back afterwards, moved to their parameter's device.
        """
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entries in saved.items():
            p = params[int(index)]
            self.state[p] = {key: _on_device(value, p.device) for key, value in entries.items()}


class GaLoreAdamW(GaLoreOptimizer):
    """AdamW with GaLore projection for groups marked ``galore=True``.

    Args:
        params: parameters or groups. Per-group keys: ``lr``, ``betas``, ``eps``, ``weight_decay``,
            ``galore`` (project this group's 2-D weights), ``rank``, ``update_proj_gap``, ``scale``,
            ``proj_type``.
        lr, betas, eps, weight_decay: AdamW hyperparameters (defaults for groups that omit them).
        rank, update_proj_gap, scale, proj_type: GaLore defaults for ``galore`` groups.
        optim_bits: 32, or 8 for bitsandbytes blockwise 8-bit moments.
        min_8bit_size: tensors (moments) smaller than this stay 32-bit in 8-bit mode.
        layerwise: project target gradients in post-accumulate-grad hooks (see module docs).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        optim_bits: int = 32,
        min_8bit_size: int = 4096,
        layerwise: bool = False,
    ) -> None:
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW hyperparameters lr={lr}, betas={betas}, eps={eps}")
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            galore=False,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
        )
        self.optim_bits = optim_bits
        self.min_8bit_size = min_8bit_size
        self._bnb = _import_bnb_functional() if optim_bits == 8 else None
        self._qmaps: dict[tuple[str, torch.device], torch.Tensor] = {}
        super().__init__(params, defaults, layerwise)

    # ------------------------------------------------------------------ step

    def _update_param(self, p: torch.Tensor, group: dict) -> None:
        """Low-rank Adam for target weights, plain AdamW for the rest."""
        if group["galore"]:
            self._galore_step(p, group)
        elif p.grad is not None:
            self._adamw_step(p, p.grad, group)

    def _galore_step(self, p: torch.Tensor, group: dict) -> None:
        """Low-rank Adam update of one target weight."""
        state = self.state[p]
        side = projection_side(p.shape, group["proj_type"])
        low = self._low_rank_grad(p, group, state, side)
        if low is None:
            return  # no gradient this step (e.g. unused layer): leave state untouched, like torch
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        if self._use_8bit(low):
            # bnb's kernel applies its own Adam step to a scratch "parameter" that starts at zero;
            # what it writes there is -(normalised low-rank update) with lr=1, which we project back.
            scratch = torch.zeros(low.shape, dtype=torch.float32, device=low.device)
            self._bnb_update(low.float().contiguous(), scratch, state, beta1, beta2, group["eps"], lr=1.0)
            p.add_(project_back(scratch.to(p.dtype), state, side, group["scale"]), alpha=lr)
        else:
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(low)
                state["exp_avg_sq"] = torch.zeros_like(low)
            state["step"] += 1
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.mul_(beta1).add_(low, alpha=1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
            denom = exp_avg_sq.sqrt().add_(group["eps"])
            # galore-torch folds bias correction into the step size (eps is not rescaled).
            step_size = lr * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
            p.add_(project_back(exp_avg / denom, state, side, group["scale"]), alpha=-step_size)
        if wd > 0.0:
            # Decoupled decay at full rank, after the update as in galore-torch.
            p.add_(p, alpha=-lr * wd)

    def _adamw_step(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        """Plain ``torch.optim.AdamW`` update (non-target parameters)."""
        state = self.state[p]
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        state.setdefault("step", 0)
        if wd > 0.0:
            p.mul_(1.0 - lr * wd)
        if self._use_8bit(p):
            self._bnb_update(grad.contiguous(), p, state, beta1, beta2, group["eps"], lr=lr)
            return
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        bias_correction1 = 1.0 - beta1 ** state["step"]
        bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** state["step"])
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
        p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)

    # ------------------------------------------------------------------ 8-bit moments

    def _use_8bit(self, moment_like: torch.Tensor) -> bool:
        """8-bit moments for tensors of at least ``min_8bit_size`` elements (bnb's rule)."""
        return self.optim_bits == 8 and moment_like.numel() >= self.min_8bit_size

    def _qmap(self, signed: bool, device: torch.device) -> torch.Tensor:
        """bnb's dynamic quantisation map (signed for m, unsigned for v), cached, not in state."""
        key = ("dynamic" if signed else "udynamic", device)
        if key not in self._qmaps:
            self._qmaps[key] = self._bnb.create_dynamic_map(signed=signed).to(device)  # type: ignore[union-attr]  # bitsandbytes is imported whenever 8-bit state exists
        return self._qmaps[key]

    def _bnb_update(
        self, grad: torch.Tensor, target: torch.Tensor, state: dict, beta1: float, beta2: float, eps: float, lr: float
    ) -> None:
        """One bitsandbytes blockwise 8-bit Adam step on ``target`` (weight decay handled by caller)."""
        if "state1" not in state:
            blocks = math.ceil(grad.numel() / _BNB_BLOCKSIZE)
            state["state1"] = torch.zeros(grad.shape, dtype=torch.uint8, device=grad.device)
            state["state2"] = torch.zeros(grad.shape, dtype=torch.uint8, device=grad.device)
            state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=grad.device)
            state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=grad.device)
        state["step"] += 1
        self._bnb.optimizer_update_8bit_blockwise(  # type: ignore[union-attr]  # bitsandbytes is imported whenever 8-bit state exists
            "adam",
            grad,
            target,
            state["state1"],
            state["state2"],
            beta1,
            beta2,
            0.0,
            0.0,
            eps,
            state["step"],
            lr,
            self._qmap(True, grad.device),
            self._qmap(False, grad.device),
            state["absmax1"],
            state["absmax2"],
            weight_decay=0.0,
        )


def _on_device(value: Any, device: torch.device) -> Any:
    """A saved state entry on ``device`` in its own dtype, a copy never shared with the source dict (nested
    dicts too: under ZeRO a flat parameter's state holds its weights' states)."""
    if torch.is_tensor(value):
        return value.to(device, copy=True)
    if isinstance(value, dict):
        return {key: _on_device(item, device) for key, item in value.items()}
    return value
