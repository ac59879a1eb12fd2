"""Streaming estimate of the averaged full-weight gradient G of every target weight.

No full-size gradient is ever materialised by autograd: the base weights keep
``requires_grad=False`` (so autograd has no ``.grad`` to fill), and for each target layer
``y = x @ W^T`` a forward hook keeps the layer input ``x`` and hangs a hook on the output, which
receives ``dL/dy`` the moment autograd produces it and folds ``G_b = (dL/dy)^T x`` into the layer's
accumulator right there. ``x`` is the tensor a LoRA training step keeps for ``lora_A`` anyway, so
the estimate's activation memory is a LoRA step's. What differs is the accumulator:

* ``"full"``: the exact sum per target, kept as its per-batch factors ``(x, dL/dy)`` while their
  ``tokens x (m + n)`` entries are fewer than G's ``m x n`` and as the fp32 G from then on (a few
  batches of short sequences on wide layers stay factored; either way the same ``addmm_`` calls
  build G, in the same order). With ``ga_layer_groups = g`` only 1/g of the sums exist at a time,
  at g passes over the cached batches. By default g is sized so that one group's sums fit in
  :data:`ACCUMULATOR_SHARE` of the memory the process already holds (:func:`layer_group_count`):
  the estimate's activations are a LoRA step's, so its peak stays within about 1.1x of the LoRA
  training peak at any model size, where a fixed g drifts up as weights outgrow activations (g=4:
  1.03x on SmolLM2-135M, 1.12x on a 0.80B model).
* ``"sketch"``: a seeded, linear two-sided randomized sketch of the running sum (Tropp, Yurtsever,
  Udell & Cevher 2017): ``Y = G @ Omega`` (m x k) and ``Z = Psi @ G`` (l x n), updated per batch as
  ``Y += dY^T (x Omega)`` and ``Z += (dY Psi^T)^T x`` without forming ``G_b``. The top singular
  triplets come from ``G ~ Q (Psi Q)^+ Z`` with ``Q = orth(Y)``. Being linear, sketches of
  different ranks sum to the sketch of the summed gradient, so DDP ranks all-reduce them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hf_lowrank_lora import LoraModule, lora_layers
from hf_lowrank_plugins import ConfigError, LowRankError
from hf_lowrank_plugins.memory import in_use_bytes

logger = logging.getLogger(__name__)

#: By default one layer group's fp32 accumulators may take this share of the memory in use.
ACCUMULATOR_SHARE = 0.1


@dataclass
class GradientFactors:
    """Top singular triplets of a layer's averaged gradient, G ~ U @ diag(S) @ Vh (m x n, LoRA orientation)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def layer_dims(layer: LoraModule) -> tuple[int, int]:
    """(out, in) of the LoRA layer's weight in LoRA orientation."""
    return int(layer.out_features), int(layer.in_features)


def seed_for(*parts: Any) -> int:
    """A stable 31-bit seed from ``parts`` (same on every process and run, unlike ``hash``)."""
    return zlib.crc32(":".join(map(str, parts)).encode()) & 0x7FFFFFFF


def collect_batches(
    dataloader: Iterable[dict[str, Any]] | None, n_batches: int, batch_size: int | None
) -> list[dict[str, Any]]:
    """The first ``n_batches`` estimate batches from ``dataloader``, each split to ``batch_size`` examples.

    Batches are dicts of tensors batched along dim 0 (what the Trainer's collators produce).
    Returns fewer batches when the dataloader runs out (a warning says so); raises when it is empty.
    """
    if dataloader is None:
        raise LowRankError("LoRA-GA needs the Trainer's training dataloader to estimate gradients; got none")
    out: list[dict[str, Any]] = []
    for batch in dataloader:
        if not isinstance(batch, dict):
            raise LowRankError(f"LoRA-GA expects dict batches from the training dataloader, got {type(batch).__name__}")
        size = next((v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0), None)
        if size is None:
            raise LowRankError("LoRA-GA found no batched tensor in a training batch")
        if batch_size is not None and batch_size > size:
            raise ConfigError(
                f"ga_batch_size {batch_size} exceeds the training dataloader's batch size {size}; use "
                f"ga_batch_size <= {size} (or leave it unset) and raise ga_batches for more examples"
            )
        step = batch_size or size
        for start in range(0, size, step):
            out.append(
                {
                    k: v[start : start + step] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == size else v
                    for k, v in batch.items()
                }
            )
            if len(out) == n_batches:
                return out
    if not out:
        raise LowRankError("LoRA-GA got no batches from the training dataloader: the training dataset is empty")
    logger.warning("LoRA-GA: the training dataloader gave only %d of ga_batches=%d batches", len(out), n_batches)
    return out


class _Accumulator:
    """Running sum of one layer's per-batch gradients (or of their sketch), in fp32."""

    def fold(self, x: torch.Tensor, g: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


class FullAccumulator(_Accumulator):
    """Exact ``G = sum_b (dL_b/dy)^T x`` (m x n): the factors while they are smaller, then G in fp32."""

    def __init__(self, m: int, n: int, device: torch.device) -> None:
        self.m, self.n, self.device = m, n, device
        self.factors: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] = []
        self.rows = 0
        self._G: torch.Tensor | None = None

    def fold(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """Add one batch's gradient ``g^T x`` (tokens flattened): keep the pair, or add it to G."""
        if self._G is None and (self.rows + x.shape[0]) * (self.m + self.n) < self.m * self.n:
            # x as the layer saw it (layers fed the same input share it), with the versions to prove it unchanged
            self.factors.append((x, g, (x._version, g._version)))
            self.rows += x.shape[0]
            return
        self.dense().addmm_(g.float().t(), x.float())

    def dense(self) -> torch.Tensor:
        """G itself: the kept pairs summed in the order they came (then dropped)."""
        if self._G is None:
            self._G = torch.zeros(self.m, self.n, device=self.device, dtype=torch.float32)
            for x, g, versions in self.factors:
                if (x._version, g._version) != versions:
                    raise LowRankError(
                        "LoRA-GA kept a layer's input and output gradient to sum later, but the model changed one "
                        "in place after the pass; use estimator='sketch', which folds each batch at once"
                    )
                self._G.addmm_(g.float().t(), x.float())
            self.factors = []
        return self._G

    def tensors(self) -> list[torch.Tensor]:
        """The tensors to all-reduce across ranks."""
        return [self.dense()]


class SketchAccumulator(_Accumulator):
    """Two-sided randomized sketch ``Y = G Omega`` (m x k), ``Z = Psi G`` (l x n) of the running sum."""

    def __init__(self, omega: torch.Tensor, psi: torch.Tensor) -> None:
        self.omega, self.psi = omega, psi  # shared by layers of equal shape: never written
        self.Y = torch.zeros(psi.shape[1], omega.shape[1], device=omega.device, dtype=torch.float32)
        self.Z = torch.zeros(psi.shape[0], omega.shape[0], device=omega.device, dtype=torch.float32)

    def fold(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """Add one batch's ``g^T x`` to both sketches, never forming the m x n product."""
        x, g = x.float(), g.float()
        self.Y.addmm_(g.t(), x @ self.omega)
        self.Z.addmm_((g @ self.psi.t()).t(), x)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors to all-reduce across ranks."""
        return [self.Y, self.Z]


def sketch_sizes(m: int, n: int, r: int, sketch_rank: int | None) -> tuple[int, int]:
    """(k, l): range-sketch rank k = min(sketch_rank or 4r, m, n), co-range rows l = min(2k + 1, m)."""
    k = min(sketch_rank or 4 * r, m, n)
    return k, min(2 * k + 1, m)


class _TestMatrices:
    """Seeded Gaussian test matrices, one per (dimension, width): identical on every rank and run."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed, self.device = seed, device
        self.cache: dict[tuple[int, int, str], torch.Tensor] = {}

    def get(self, rows: int, cols: int, tag: str) -> torch.Tensor:
        key = (rows, cols, tag)
        if key not in self.cache:
            gen = torch.Generator().manual_seed(seed_for(self.seed, *key))
            self.cache[key] = torch.randn(rows, cols, generator=gen).div_(math.sqrt(cols)).to(self.device)
        return self.cache[key]


def _make_input_require_grad(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: give the first target layer an input that requires grad.

    Everything is frozen during the estimate, so without this no output would carry ``dL/dy``.
    Detaching a tensor that does not require grad cuts nothing off the graph.
    """
    x = args[0]
    if torch.is_grad_enabled() and torch.is_tensor(x) and x.is_floating_point() and not x.requires_grad:
        return (x.detach().requires_grad_(), *args[1:])
    return None


def _fold_hook(accumulator: _Accumulator):
    """Forward hook: keep ``x`` and fold ``(dL/dy)^T x`` into ``accumulator`` when autograd produces ``dL/dy``.

    ``(dL/dy)^T x`` is the gradient in LoRA orientation (out x in) also for transposed (Conv1D) weights.
    """

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not (torch.is_tensor(output) and output.requires_grad):
            return  # no-grad forward (e.g. the first pass of reentrant checkpointing): nothing to fold
        held = [args[0].detach()]

        def on_grad(grad: torch.Tensor) -> None:
            x = held.pop()  # the accumulator keeps x only while its factors are smaller than G
            accumulator.fold(x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1]))

        output.register_hook(on_grad)

    return hook


@contextlib.contextmanager
def frozen_for_estimate(model: nn.Module) -> Iterator[None]:
    """Inside: every parameter frozen, every module in train mode; both restored afterwards.

    Frozen LoRA factors mean the estimate leaves no ``.grad`` anywhere and never fires DDP's
    gradient hooks; train mode is the state the Trainer trains in (dropout as configured).
    """
    requires = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    try:
        for p in requires:
            p.requires_grad_(False)
        model.train()
        yield
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode


def _autocast(args: Any, device: torch.device) -> contextlib.AbstractContextManager:
    """The mixed-precision context the Trainer's training step runs its forward in."""
    if args is not None and getattr(args, "bf16", False):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if args is not None and getattr(args, "fp16", False):
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _run_pass(
    model: nn.Module,
    layers: dict[str, LoraModule],
    accumulators: dict[str, _Accumulator],
    batches: list[dict[str, Any]],
    seed: int,
    args: Any,
    device: torch.device,
) -> None:
    """One forward/backward over ``batches`` folding the gradients of ``accumulators``' layers."""
    handles = []
    try:
        for name, acc in accumulators.items():
            base = layers[name].get_base_layer()
            handles.append(base.register_forward_pre_hook(_make_input_require_grad))
            handles.append(base.register_forward_hook(_fold_hook(acc)))
        torch.manual_seed(seed)  # same dropout masks in every pass, so every group sees the same G
        for batch in batches:
            with _autocast(args, device):
                out = model(**_to_device(batch, device))
            loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
            if loss is None:
                raise LowRankError(
                    "LoRA-GA estimates the gradient of the model's own loss, but the model returned none: the training "
                    "batches must carry labels (Trainer/SFTTrainer data, e.g. DataCollatorForLanguageModeling(mlm=False)); "
                    "preference trainers (DPO, reward) compute their loss outside the model: initialise LoRA-GA in an SFT "
                    "run, then continue from its adapter"
                )
            loss.float().backward()
            del out, loss
    finally:
        for h in handles:
            h.remove()


def _all_reduce(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` over DDP ranks (no-op outside torch.distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def _truncated_svd(G: torch.Tensor, k: int, svd: str, niter: int, seed: int) -> GradientFactors:
    if svd == "exact":
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[G.device.index or 0] if G.device.type == "cuda" else []):
            torch.manual_seed(seed)  # svd_lowrank takes no generator; every rank must draw the same projection
            U, S, V = torch.svd_lowrank(G, q=min(2 * k, min(G.shape)), niter=niter)
        Vh = V.t()
    return GradientFactors(U[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].contiguous())


def _sketch_svd(acc: SketchAccumulator, scale: float, k: int) -> GradientFactors:
    """Top-k triplets of the sketched G: Q = orth(Y), X = (Psi Q)^+ Z, G ~ Q X."""
    Y, Z = acc.Y * scale, acc.Z * scale
    Q, _ = torch.linalg.qr(Y)
    X = torch.linalg.lstsq(acc.psi @ Q, Z).solution
    Ux, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return GradientFactors((Q @ Ux)[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].contiguous())


def batch_rows(batches: list[dict[str, Any]]) -> int | None:
    """The rows (tokens) a layer's input has over all ``batches``: per batch, the largest
    ``batch x sequence`` among its tensors of two or more dimensions; ``None`` when a batch has none."""
    total = 0
    for batch in batches:
        sizes = [v.shape[0] * v.shape[1] for v in batch.values() if torch.is_tensor(v) and v.dim() >= 2]
        if not sizes:
            return None
        total += max(sizes)
    return total


def accumulator_bytes(m: int, n: int, rows: int | None) -> int:
    """What a :class:`FullAccumulator` of an ``m x n`` layer holds after ``rows`` tokens, at most (fp32
    factors, each layer's input counted as its own): the factors or, once larger, G."""
    entries = m * n if rows is None else min(rows * (m + n), m * n)
    return 4 * entries


def accumulator_sizes(layers: dict[str, LoraModule], rows: int | None = None) -> dict[str, int]:
    """:func:`accumulator_bytes` of every layer after ``rows`` tokens, in model order."""
    return {name: accumulator_bytes(*layer_dims(layer), rows) for name, layer in layers.items()}


def _groups(sizes: dict[str, int], n_groups: int) -> list[list[str]]:
    """Split the layers of ``sizes`` (in model order) into ``n_groups`` contiguous groups of about equal bytes."""
    target, acc = sum(sizes.values()) / n_groups, 0.0
    groups: list[list[str]] = []
    current: list[str] = []
    for name, size in sizes.items():
        current.append(name)
        acc += size
        if acc >= target * (len(groups) + 1) and len(groups) < n_groups - 1:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def layer_group_count(
    config: Any,
    layers: dict[str, LoraModule],
    device: torch.device,
    model: nn.Module | None = None,
    rows: int | None = None,
) -> int:
    """How many layer groups the ``full`` estimator makes: ``config.ga_layer_groups``, or by default the
    fewest whose largest group's accumulators (after ``rows`` tokens, see :func:`accumulator_bytes`) fit
    in :data:`ACCUMULATOR_SHARE` of :func:`in_use_bytes`.

    Every DDP rank makes the largest count any rank asks for: the per-group all-reduces must line up.
    """
    if config.ga_layer_groups is not None:
        return int(config.ga_layer_groups)
    sizes = accumulator_sizes(layers, rows)
    # the passes read every weight: count ``model``'s tensors as held even if not paged in yet
    tensors = [*model.parameters(), *model.buffers()] if model is not None else []
    in_use = in_use_bytes(device, tensors)
    budget = ACCUMULATOR_SHARE * in_use
    count = len(sizes)  # without a reading of memory in use (no /proc), the least memory: one layer a pass
    if budget > 0:
        count = next((g for g in range(1, len(sizes) + 1) if _largest_group_bytes(sizes, g) <= budget), len(sizes))
    agreed = torch.tensor([float(count)], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    count = int(agreed.item())
    logger.info(
        "LoRA-GA: %d layer group(s), %.0f MiB of accumulators at a time (%.0f MiB in use)",
        count,
        _largest_group_bytes(sizes, count) / 2**20,
        in_use / 2**20,
    )
    return count


def _largest_group_bytes(sizes: dict[str, int], n_groups: int) -> int:
    """Bytes of the largest of the ``n_groups`` groups :func:`_groups` makes of ``sizes``."""
    return max(sum(sizes[n] for n in group) for group in _groups(sizes, n_groups))


def estimate_gradient_factors(
    model: nn.Module,
    config: Any,
    batches: list[dict[str, Any]],
    args: Any = None,
    adapter: str = "default",
) -> dict[str, GradientFactors]:
    """Top-2r singular triplets of the mean gradient of every LoRA layer's base weight over ``batches``.

    G is the mean over batches (and DDP ranks) of the per-batch mean-loss gradient, taken with the
    model in train mode under the Trainer's mixed precision; ``config`` is a :class:`LoraGaConfig`.
    The caller's RNG state, requires_grad flags and train/eval modes are left as they were.
    """
    layers = lora_layers(model, adapter)
    if not layers:
        raise LowRankError("LoRA-GA found no LoRA layer to initialise; attach it with attach(model, 'lora_ga')")
    device: torch.device = next(iter(layers.values())).get_base_layer().weight.device
    names = list(layers)
    n_local = torch.tensor([float(len(batches))], device=device)
    _all_reduce([n_local])
    inv_batches = 1.0 / float(n_local.item())
    ranks = {n: layers[n].r[adapter] for n in names}
    cuda = [device.index or 0] if device.type == "cuda" else []
    results: dict[str, GradientFactors] = {}
    with torch.random.fork_rng(devices=cuda), frozen_for_estimate(model):
        if config.estimator == "sketch":
            tests = _TestMatrices(config.ga_seed, device)
            sketches: dict[str, SketchAccumulator] = {}
            for n in names:
                m, d = layer_dims(layers[n])
                k, l = sketch_sizes(m, d, ranks[n], config.sketch_rank)  # noqa: E741 - the sketch sizes of Tropp et al.
                sketches[n] = SketchAccumulator(tests.get(d, k, "omega"), tests.get(l, m, "psi"))
            _run_pass(model, layers, dict(sketches), batches, config.ga_seed, args, device)
            for n in names:
                _all_reduce(sketches[n].tensors())
                results[n] = _sketch_svd(sketches[n], inv_batches, 2 * ranks[n])
                del sketches[n]  # free each sketch once factored
        else:
            rows = batch_rows(batches)
            count = layer_group_count(config, layers, device, model, rows)
            for group in _groups(accumulator_sizes(layers, rows), count):
                sums = {n: FullAccumulator(*layer_dims(layers[n]), device) for n in group}
                _run_pass(model, layers, dict(sums), batches, config.ga_seed, args, device)
                for n in group:
                    _all_reduce(sums[n].tensors())
                    G = sums.pop(n).dense().mul_(inv_batches)
                    results[n] = _truncated_svd(
                        G, 2 * ranks[n], config.svd, config.svd_niter, seed_for(config.ga_seed, n)
                    )
                    del G
    return results
