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
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from hf_lowrank_lora import LoraModule, lora_layers
from hf_lowrank_plugins import ConfigError, LowRankError
from hf_lowrank_plugins.memory import in_use_bytes, trim_heap

from .accumulators import (
    Accumulator,
    FullAccumulator,
    GradientFactors,
    SketchAccumulator,
    SketchMatrices,
    compact_factors,
    seed_for,
    sketch_sizes,
    sketch_svd,
    truncated_svd,
)
from .grouping import ACCUMULATOR_SHARE, LayerInput, PassMemory, batch_rows, layer_group_count, layer_groups

logger = logging.getLogger(__name__)


def layer_dims(layer: LoraModule) -> tuple[int, int]:
    """(out, in) of the LoRA layer's weight in LoRA orientation."""
    return int(layer.out_features), int(layer.in_features)


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

    def __init__(self, accumulators: dict[str, Accumulator], record_inputs: bool = False) -> None:
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


def _agree(values: list[float], device: torch.device) -> list[float]:
    """The largest of each of ``values`` over DDP ranks (themselves outside torch.distributed)."""
    agreed = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return agreed.tolist()


def _factor(
    name: str, accumulator: Accumulator, layer: LoraModule, config: Any, adapter: str, scale: float
) -> GradientFactors:
    """All-reduce the layer's sum, scale it to the mean and take its top-2r triplets."""
    _all_reduce(accumulator.tensors())
    G = cast(FullAccumulator, accumulator).dense().mul_(scale)
    r = layer.r[adapter]
    return truncated_svd(G, 2 * r, config.svd, config.svd_niter, seed_for(config.ga_seed, name))


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
        sums: dict[str, Accumulator] = {n: FullAccumulator(*layer_dims(layers[n]), device) for n in pending.pop(0)}
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
            tests = SketchMatrices(config.ga_seed, device)
            sketches: dict[str, SketchAccumulator] = {}
            for n in names:
                m, d = layer_dims(layers[n])
                k, l = sketch_sizes(m, d, ranks[n], config.sketch_rank)  # noqa: E741 - the sketch sizes of Tropp et al.
                sketches[n] = SketchAccumulator(tests.get(d, k, "omega"), tests.get(l, m, "psi"))
            _run_pass(model, layers, _Taps(dict(sketches)), batches, config.ga_seed, args, device)
            for n in names:
                _all_reduce(sketches[n].tensors())
                results[n] = sketch_svd(sketches[n], inv_batches, 2 * ranks[n])
                del sketches[n]  # free each sketch once factored
        else:
            results = _estimate_exact(model, layers, config, batches, args, adapter, inv_batches)
    return results
