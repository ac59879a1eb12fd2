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
  at g passes over the cached batches. By default g is the fewest groups whose sums add at most
  :data:`ACCUMULATOR_SHARE` of the memory in use to a pass's peak (:func:`layer_group_count`),
  sized in the first pass once its first forward has shown what the sums will hold (their dtypes;
  q/k/v and gate/up keep one shared input) and what the pass holds besides (weights, libraries,
  one batch's activations: about a LoRA step's peak). The sums of every batch but the last are
  what they add at the peak, the start of the last backward: the last batch's ``x`` are its
  activations and its ``dL/dy`` take the place its backward frees (on a CPU once
  :func:`compact_factors` has moved the earlier pairs out of the heap). So the estimate stays within about 1.1x of the LoRA training peak at any model
  size, where a fixed g drifts up as weights outgrow activations (g=4: 1.03x on SmolLM2-135M,
  1.12x on a 0.80B model), and takes one pass where that fits (SmolLM2-135M, two batches of
  2 x 64 tokens).
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
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from hf_lowrank_lora import LoraModule, lora_layers
from hf_lowrank_plugins import ConfigError, LowRankError
from hf_lowrank_plugins.memory import in_use_bytes, trim_heap

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


def factors_outgrow_sum(rows: int, m: int, n: int) -> bool:
    """Whether ``rows`` tokens of an ``m x n`` layer's factors, ``rows x (m + n)`` entries, are at least
    its sum G's ``m x n``: from then on :class:`FullAccumulator` holds G instead."""
    return rows * (m + n) >= m * n


def seed_for(*parts: Any) -> int:
    """A stable 31-bit seed from ``parts`` (same on every process and run, unlike ``hash``)."""
    return zlib.crc32(":".join(map(str, parts)).encode()) & 0x7FFFFFFF


def collect_batches(
    dataloader: Iterable[dict[str, Any]] | None, n_batches: int, batch_size: int | None
) -> list[dict[str, Any]]:
    """The first ``n_batches`` estimate batches from ``dataloader``, each split to ``batch_size`` examples.

    Batches are mappings of tensors batched along dim 0 (what the Trainer's collators produce: a
    ``dict``, or the ``BatchEncoding`` of tokenizer-based collators such as ``DataCollatorForSeq2Seq``).
    Returns fewer batches when the dataloader runs out (a warning says so); raises when it is empty.
    """
    if dataloader is None:
        raise LowRankError("LoRA-GA needs the Trainer's training dataloader to estimate gradients; got none")
    out: list[dict[str, Any]] = []
    for batch in dataloader:
        if not isinstance(batch, Mapping):
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
        self.compacted = 0  # factors already moved by compact_factors

    def fold(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """Add one batch's gradient ``g^T x`` (tokens flattened): keep the pair, or add it to G."""
        if self._G is None and not factors_outgrow_sum(self.rows + x.shape[0], self.m, self.n):
            # x as the layer saw it (layers fed the same input share it), with the versions to prove it unchanged
            self.factors.append((x, g, (x._version, g._version)))
            self.rows += x.shape[0]
            return
        self.dense().addmm_(g.float().t(), x.float())

    def checked_factors(self) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
        """The kept pairs, each proven unchanged since it was folded (by its version counters)."""
        for x, g, versions in self.factors:
            if (x._version, g._version) != versions:
                raise LowRankError(
                    "LoRA-GA kept a layer's input and output gradient to sum later, but the model changed one "
                    "in place after the pass; use estimator='sketch', which folds each batch at once"
                )
        return self.factors

    def dense(self) -> torch.Tensor:
        """G itself: the kept pairs summed in the order they came (then dropped)."""
        if self._G is None:
            self._G = torch.zeros(self.m, self.n, device=self.device, dtype=torch.float32)
            for x, g, _ in self.checked_factors():
                self._G.addmm_(g.float().t(), x.float())
            self.factors = []
        return self._G

    def tensors(self) -> list[torch.Tensor]:
        """The tensors to all-reduce across ranks."""
        return [self.dense()]


def compact_factors(accumulators: Iterable[_Accumulator], device: torch.device) -> int:
    """Move the pairs the sums kept since the last call into one buffer of their own; returns its bytes.

    Called on a CPU after each batch's backward but the last. The kept ``x`` and ``dL/dy`` were
    allocated among that batch's activations, and glibc's heap, holding them in the middle of the
    freed space, fits the next batch's activations only partly around them. Copied out into one block
    (above glibc's mmap threshold, so outside the heap) and the heap's free pages handed back, the
    next forward lays its activations out as the first did. SmolLM2-135M, two batches of 2 x 64
    tokens, one group: the pass peaked at 1,586 MiB without this and 1,522-1,525 MiB with it,
    against 1,450 MiB for a LoRA training step; the copy (118 MiB) and the trim took 55 ms. An input
    that layers share (q/k/v's) is copied once; every copy starts 64-byte aligned, as the
    allocator's own tensors do.
    """
    pending = [
        (acc, index)
        for acc in accumulators
        if isinstance(acc, FullAccumulator)
        for index in range(acc.compacted, len(acc.checked_factors()))
    ]
    unique: dict[tuple[int, tuple[int, ...], torch.dtype], torch.Tensor] = {}
    for acc, index in pending:
        for tensor in acc.factors[index][:2]:
            unique.setdefault((tensor.data_ptr(), tuple(tensor.shape), tensor.dtype), tensor)
    offsets, total = {}, 0
    for key, tensor in unique.items():
        offsets[key] = total
        total += -(-tensor.numel() * tensor.element_size() // 64) * 64
    if not total:
        return 0
    block = torch.empty(total, dtype=torch.uint8, device=device)
    copies = {}
    for key, tensor in unique.items():
        start = offsets[key]
        view = block[start : start + tensor.numel() * tensor.element_size()].view(tensor.dtype).view(tensor.shape)
        copies[key] = view.copy_(tensor)
    for acc, index in pending:
        x, g, _ = acc.factors[index]
        x, g = (copies[(t.data_ptr(), tuple(t.shape), t.dtype)] for t in (x, g))
        acc.factors[index] = (x, g, (x._version, g._version))
    for acc in {id(acc): acc for acc, _ in pending}.values():
        acc.compacted = len(acc.factors)
    return total


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


class _Kept:
    """A layer input ``x`` kept from one forward call until its ``dL/dy`` arrives."""

    __slots__ = ("__weakref__", "x")

    def __init__(self, x: torch.Tensor) -> None:
        self.x: torch.Tensor | None = x


class _Taps:
    """The hooks of one pass: each target layer keeps its input ``x`` and folds ``(dL/dy)^T x`` into its
    accumulator when autograd produces ``dL/dy`` (the gradient in LoRA orientation, out x in, also for
    transposed Conv1D weights).

    While :attr:`inputs` is a dict, the forward also records each layer's :class:`LayerInput` (the
    first batch of a pass that sizes the layer groups). :meth:`drop` stops layers mid-pass and lets go
    of the inputs they kept.
    """

    def __init__(self, accumulators: dict[str, _Accumulator], record_inputs: bool = False) -> None:
        self.accumulators = accumulators
        self.inputs: dict[str, LayerInput] | None = {} if record_inputs else None
        # weakly: a call whose output never gets a gradient (a recomputation for non-reentrant
        # checkpointing) drops its input with that output
        self.kept: dict[str, weakref.WeakSet[_Kept]] = {name: weakref.WeakSet() for name in accumulators}

    def forward_hook(self, name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        """The forward hook of layer ``name``."""

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name not in self.accumulators or not (torch.is_tensor(output) and output.requires_grad):
                return  # a dropped layer, or a no-grad forward (the first pass of reentrant checkpointing)
            x = args[0].detach()
            if self.inputs is not None:
                self.inputs[name] = LayerInput.of(x, output)
            kept = _Kept(x)  # the accumulator keeps x only while its factors are smaller than G
            self.kept[name].add(kept)

            def on_grad(grad: torch.Tensor) -> None:
                x, kept.x = kept.x, None
                accumulator = self.accumulators.get(name)
                if x is None or accumulator is None:
                    return
                accumulator.fold(x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1]))

            output.register_hook(on_grad)

        return hook

    def drop(self, names: Iterable[str]) -> None:
        """Stop folding for ``names`` in this pass and let go of the inputs they kept."""
        for name in names:
            self.accumulators.pop(name, None)
            for kept in self.kept.pop(name, ()):
                kept.x = None


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
    taps: _Taps,
    batches: list[dict[str, Any]],
    seed: int,
    args: Any,
    device: torch.device,
    after_first_forward: Callable[[], None] | None = None,
) -> None:
    """One forward/backward over ``batches`` folding the gradients of the layers ``taps`` holds sums for;
    ``after_first_forward`` runs between the first batch's forward and its backward."""
    handles = []
    try:
        for name in taps.accumulators:
            base = layers[name].get_base_layer()
            handles.append(base.register_forward_pre_hook(_make_input_require_grad))
            handles.append(base.register_forward_hook(taps.forward_hook(name)))
        torch.manual_seed(seed)  # same dropout masks in every pass, so every group sees the same G
        for index, batch in enumerate(batches):
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
            if index == 0 and after_first_forward is not None:
                after_first_forward()
            loss.float().backward()
            del out, loss
            if (
                device.type == "cpu"
                and index < len(batches) - 1
                and compact_factors(taps.accumulators.values(), device)
            ):
                trim_heap()  # the pages the kept pairs and the batch's activations held
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


@dataclass(frozen=True)
class LayerInput:
    """What one layer's exact sum (:class:`FullAccumulator`) holds per token, as seen in a forward."""

    out_features: int
    in_features: int
    input_key: int  # the input's storage: layers fed the same tensor (q/k/v, gate/up) keep it once
    input_row_bytes: int  # one row of x in the dtype the layer saw
    grad_row_bytes: int  # one row of dL/dy, in the output's dtype

    @classmethod
    def of(cls, x: torch.Tensor, output: torch.Tensor) -> LayerInput:
        """The layer that read ``x`` and wrote ``output``."""
        n, m = x.shape[-1], output.shape[-1]
        return cls(m, n, x.untyped_storage().data_ptr(), n * x.element_size(), m * output.element_size())

    @classmethod
    def assumed(cls, m: int, n: int, key: int) -> LayerInput:
        """An ``m x n`` layer not seen in a forward: fp32 rows and an input of its own (``key``)."""
        return cls(m, n, key, 4 * n, 4 * m)

    def is_dense(self, rows: int | None) -> bool:
        """Whether after ``rows`` tokens the sum is fp32 G (:meth:`FullAccumulator.fold`'s switch);
        ``None``: unknown tokens, counted as G."""
        return rows is None or factors_outgrow_sum(rows, self.out_features, self.in_features)


def held_bytes(group: Iterable[str], inputs: dict[str, LayerInput], rows: int | None) -> int:
    """What the sums of the layers in ``group`` hold after ``rows`` tokens: fp32 G for a layer past
    :class:`FullAccumulator`'s switch, else its rows of ``dL/dy`` and of its input, an input that
    several layers of the group read counted once."""
    total, kept_inputs = 0, {}
    for name in group:
        layer = inputs[name]
        if layer.is_dense(rows):
            total += 4 * layer.out_features * layer.in_features
        else:
            assert rows is not None  # for mypy: is_dense(None) is True
            total += rows * layer.grad_row_bytes
            kept_inputs[layer.input_key] = rows * layer.input_row_bytes
    return total + sum(kept_inputs.values())


def accumulator_bytes(m: int, n: int, rows: int | None) -> int:
    """What a :class:`FullAccumulator` of an ``m x n`` layer holds after ``rows`` tokens, at most (fp32
    factors, the layer's input counted as its own): the factors or, once larger, G (:func:`held_bytes`)."""
    return held_bytes(["layer"], {"layer": LayerInput.assumed(m, n, 0)}, rows)


def layer_groups(inputs: dict[str, LayerInput], rows: int | None, count: int) -> list[list[str]]:
    """``inputs``' layers (in model order) in ``count`` contiguous groups of about equal sums after ``rows`` tokens."""
    sizes = {name: held_bytes([name], inputs, rows) for name in inputs}
    target, acc = sum(sizes.values()) / count, 0.0
    groups: list[list[str]] = []
    current: list[str] = []
    for name, size in sizes.items():
        current.append(name)
        acc += size
        if acc >= target * (len(groups) + 1) and len(groups) < count - 1:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


@dataclass(frozen=True)
class PassMemory:
    """What a pass over the estimate batches holds besides the sums, read after the first batch's forward."""

    in_use: int  # the memory in use then (in_use_bytes): weights, libraries, one batch's activations
    rows_before_last: int | None  # tokens of every batch but the last
    rows: int | None  # tokens of all batches

    def peak_bytes(self, group: list[str], inputs: dict[str, LayerInput]) -> int:
        """What the sums of ``group`` add to the pass's peak, at the start of the last backward: those
        of every batch but the last. The last batch's inputs are its activations, and its ``dL/dy``
        arrive as its backward frees them (on a CPU once :func:`compact_factors` has kept the heap's
        layout: SmolLM2-135M's last backward then grew by what a LoRA step's does)."""
        return held_bytes(group, inputs, self.rows_before_last)


def layer_group_count(inputs: dict[str, LayerInput], memory: PassMemory) -> int:
    """The fewest contiguous layer groups (:func:`layer_groups`) whose sums each add at most
    :data:`ACCUMULATOR_SHARE` of ``memory.in_use`` to a pass's peak (:meth:`PassMemory.peak_bytes`);
    one layer a pass without a reading of the memory in use (no ``/proc``)."""
    budget = ACCUMULATOR_SHARE * memory.in_use
    if budget > 0:
        for count in range(1, len(inputs) + 1):
            groups = layer_groups(inputs, memory.rows, count)
            if max(memory.peak_bytes(group, inputs) for group in groups) <= budget:
                return count
    return len(inputs)


def _agree(values: list[float], device: torch.device) -> list[float]:
    """The largest of each of ``values`` over DDP ranks (themselves outside torch.distributed)."""
    agreed = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return agreed.tolist()


def _factor(
    name: str, accumulator: _Accumulator, layer: LoraModule, config: Any, adapter: str, scale: float
) -> GradientFactors:
    """All-reduce the layer's sum, scale it to the mean and take its top-2r triplets."""
    _all_reduce(accumulator.tensors())
    G = cast(FullAccumulator, accumulator).dense().mul_(scale)
    r = layer.r[adapter]
    return _truncated_svd(G, 2 * r, config.svd, config.svd_niter, seed_for(config.ga_seed, name))


def _size_groups(
    taps: _Taps,
    assumed: dict[str, LayerInput],
    tensors: list[torch.Tensor],
    rows_before_last: int | None,
    rows: int | None,
    device: torch.device,
) -> list[list[str]]:
    """The layer groups, sized in the first pass after its first batch's forward (see
    :func:`_estimate_exact`); ``taps`` goes on with the first group only."""
    inputs = {n: (taps.inputs or {}).get(n) or assumed[n] for n in assumed}
    in_use = in_use_bytes(device, tensors)
    count = layer_group_count(inputs, PassMemory(in_use, rows_before_last, rows))
    # every DDP rank takes the largest count and token counts: the per-group all-reduces must line up
    agreed = _agree([count, *(math.inf if r is None else r for r in (rows_before_last, rows))], device)
    memory = PassMemory(in_use, *(None if math.isinf(r) else int(r) for r in agreed[1:]))
    groups = layer_groups(inputs, memory.rows, int(agreed[0]))
    logger.info(
        "LoRA-GA: %d layer group(s), the sums adding at most %.0f MiB to a pass (budget: %.0f%% of %.0f MiB in use "
        "after the first forward)",
        len(groups),
        max(memory.peak_bytes(g, inputs) for g in groups) / 2**20,
        100 * ACCUMULATOR_SHARE,
        memory.in_use / 2**20,
    )
    taps.drop([n for group in groups[1:] for n in group])
    return groups


def _estimate_exact(
    model: nn.Module,
    layers: dict[str, LoraModule],
    config: Any,
    batches: list[dict[str, Any]],
    args: Any,
    adapter: str,
    inv_batches: float,
) -> dict[str, GradientFactors]:
    """``estimator="full"``: the exact sums, one layer group a pass.

    With ``ga_layer_groups`` unset, the first pass starts with every layer and sizes the groups
    (:func:`layer_group_count`) after its first batch's forward, when it has seen what the sums will
    hold (the dtypes, which layers share an input) and what a pass holds besides them (the memory in
    use then); it goes on with the first group only. Nothing of that forward is wasted: the first
    group starts at the model's first layer, so its backward runs through the whole model.
    """
    device: torch.device = next(iter(layers.values())).get_base_layer().weight.device
    rows_per_batch = [batch_rows([batch]) for batch in batches]
    known = None not in rows_per_batch
    rows = sum(cast(list[int], rows_per_batch)) if known else None
    rows_before_last = sum(cast(list[int], rows_per_batch[:-1])) if known else None
    assumed = {n: LayerInput.assumed(*layer_dims(layer), i) for i, (n, layer) in enumerate(layers.items())}
    tensors = [*model.parameters(), *model.buffers()]  # the passes read every weight: count them as held
    sizing = config.ga_layer_groups is None
    pending = [list(layers)] if sizing else layer_groups(assumed, rows, int(config.ga_layer_groups))
    results: dict[str, GradientFactors] = {}
    while pending:
        sums: dict[str, _Accumulator] = {n: FullAccumulator(*layer_dims(layers[n]), device) for n in pending.pop(0)}
        taps = _Taps(sums, record_inputs=sizing)
        sized: list[list[str]] = []

        def size_groups(taps: _Taps = taps, sized: list[list[str]] = sized) -> None:
            sized.extend(_size_groups(taps, assumed, tensors, rows_before_last, rows, device))

        _run_pass(model, layers, taps, batches, config.ga_seed, args, device, size_groups if sizing else None)
        if sizing:
            pending, sizing = sized[1:], False
        for name in list(sums):  # one at a time: each sum is freed once factored
            results[name] = _factor(name, sums.pop(name), layers[name], config, adapter, inv_batches)
    return results


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
            _run_pass(model, layers, _Taps(dict(sketches)), batches, config.ga_seed, args, device)
            for n in names:
                _all_reduce(sketches[n].tensors())
                results[n] = _sketch_svd(sketches[n], inv_batches, 2 * ranks[n])
                del sketches[n]  # free each sketch once factored
        else:
            results = _estimate_exact(model, layers, config, batches, args, adapter, inv_batches)
    return results
