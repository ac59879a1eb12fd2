"""Plain LoRA with its update added inside the rank-r product: ``addmm(W x, s A x, B^T)``.

PEFT's plain LoRA forward is ``result + lora_B(lora_A(dropout(x))) * scaling``: after the two
rank-r products it makes two more passes over a ``tokens x out`` tensor (the multiply by
``scaling``, even at ``s = 1``, then the sum), each allocating a new output, and backward makes
one more for the multiply's gradient. Here ``s`` multiplies the ``tokens x r`` hidden instead and
the sum happens in the second product's own GEMM (``torch.addmm`` with ``beta = 1``), whose
backward hands the incoming gradient to ``result`` unchanged. Same maths, up to float rounding
(``B (s h)`` against ``s (B h)``, and the GEMM's accumulation order).

The variant sits in PEFT's own per-layer ``lora_variant`` slot, as DoRA's does, so PEFT keeps
everything else: adapters by name, dropout, dtype casts, mixed-batch inference, merging (through
:meth:`FusedAddLoraVariant.merge_safe` and friends, which do exactly PEFT's plain merge). What is
saved is untouched: the adapter is a plain PEFT LoRA adapter.

Where nothing else needs the base layer's own call, :class:`FusedLoraLinear` goes one step further
and computes the whole layer in one autograd node (:class:`LoraLinearFunction`): ``x W^T`` with the
update added into it by ``addmm_``, and in backward ``dL/dx = g W + (s g B) A`` accumulated by one
``addmm_`` instead of two products and autograd's separate sum, and one autograd node and Python
call where PEFT's path makes about eight. On SmolLM2-135M that is 1-2% of a training step on a
2-core CPU (``benchmarks/paired_steps.py``, ``ours:lora`` against ``ours:lora_variant_only``); what
LoRA costs beyond the frozen base there is mostly its rank-r products, which are the same here.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, cast

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraVariant
from torch import nn
from torch.autograd.function import once_differentiable

from hf_lowrank_plugins.distributed import is_partitioned


class FusedAddLoraVariant(LoraVariant):
    """Plain LoRA whose ``s B A x`` is added to the base output by ``addmm``; see the module docstring."""

    @staticmethod
    def init(module: Any, adapter_name: str, **kwargs: Any) -> None:
        """Nothing to create: the variant uses PEFT's own ``lora_A``, ``lora_B`` and ``scaling``."""

    @staticmethod
    def merge_safe(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        """``W + s B A`` as a new tensor, as PEFT's plain safe merge computes it."""
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> None:
        """``W += s B A`` in place, as PEFT's plain merge does."""
        orig_weight.data += module.get_delta_weight(active_adapter)

    @staticmethod
    def unmerge(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        """``W - s B A``, the base weight again up to float rounding."""
        return orig_weight.data - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def fused_forward(module: Any, active_adapter: str, x: torch.Tensor) -> torch.Tensor | None:
        """The whole layer as one autograd node (:class:`LoraLinearFunction`); called by
        :class:`FusedLoraLinear` only where nothing needs the base layer's own call."""
        base, scaling = module.base_layer, module.scaling[active_adapter]
        lora_A, lora_B = module.lora_A[active_adapter].weight, module.lora_B[active_adapter].weight
        flat_out = LoraLinearFunction.apply(x, base.weight, base.bias, lora_A, lora_B, scaling)
        return unflatten_output(cast(torch.Tensor, flat_out), x)

    @staticmethod
    def forward(module: Any, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``result + s B A dropout(x)``, the sum taken by the GEMM of ``B`` (:func:`add_scaled_lora`)."""
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        x = module.lora_dropout[active_adapter](x)
        return add_scaled_lora(result, x, lora_A, lora_B, module.scaling[active_adapter])


def add_scaled_lora(
    result: torch.Tensor,
    x: torch.Tensor,
    lora_A: nn.Module,
    lora_B: nn.Module,
    scaling: float,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``result + s * B A x`` as a new tensor: ``s`` scales the rank-r ``A x`` (r columns where PEFT
    scales ``out``) and ``torch.addmm`` adds ``B``'s product to ``result`` in the same GEMM.

    ``lora_A`` and ``lora_B`` are the bias-free ``nn.Linear`` factors PEFT creates. The sum is taken in
    the wider of ``result``'s and the update's dtypes, or ``dtype`` where that is wider still: DoRA's
    forward builds its ``base + s lora`` with it too, in its magnitude's dtype, since PEFT's DoRA sums
    a 16-bit base output (autocast's) and its update in fp32.
    """
    hidden = lora_A(x)
    if scaling != 1:
        hidden = hidden * scaling
    weight = cast(torch.Tensor, lora_B.weight)
    if is_partitioned(weight):
        # DeepSpeed ZeRO-3 gathers a partitioned weight only inside its module's own call
        return result + lora_B(hidden)
    # PEFT's sum promotes to the wider of the base output's and the adapter's dtypes, and its caller
    # casts back to the base's; addmm needs one dtype, so the promotion is made explicit (an fp32 base
    # output is never rounded to a bf16 adapter's precision)
    dtype = torch.promote_types(torch.promote_types(result.dtype, hidden.dtype), dtype or result.dtype)
    flat_result = result.reshape(-1, result.shape[-1]).to(dtype)
    with without_autocast(result.device.type):  # autocast would take the sum in 16 bits again
        summed = torch.addmm(flat_result, hidden.reshape(-1, hidden.shape[-1]).to(dtype), weight.t().to(dtype))
    return summed.view(*result.shape[:-1], summed.shape[-1])


def without_autocast(device_type: str) -> AbstractContextManager[Any]:
    """A context with autocast off on ``device_type``: nothing to enter where it is off already (entering
    ``torch.autocast(enabled=False)`` costs about 7 us, per layer and call)."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def lora_linear_forward(
    flat_x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x W^T (+ b) + s (x A^T) B^T`` of a ``tokens x in`` input, the update added into the base
    product by ``addmm_``; returns it with the scaled hidden ``s x A^T`` that backward needs.

    The forward of :class:`LoraLinearFunction` and, without the bias, of DoRA's one-node layer.
    """
    hidden = flat_x @ lora_A.t()
    if scaling != 1:
        hidden = hidden * scaling
    out = flat_x @ weight.t() if bias is None else torch.addmm(bias, flat_x, weight.t())
    out.addmm_(hidden, lora_B.t())
    return out, hidden


def lora_linear_backward(
    flat_grad: torch.Tensor,
    flat_x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    hidden: torch.Tensor,
    scaling: float,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the flat input, ``A`` and ``B`` (each only where ``needs_grad`` asks) of
    :func:`lora_linear_forward`'s output, given its gradient ``g``: ``g^T h`` for ``B``, ``(s g B)^T x``
    for ``A``, and ``g W`` with ``(s g B) A`` added into it by ``addmm_`` for the input.

    DoRA's one-node layer calls it with its gradient scaled by ``m/n``.
    """
    needs_x, needs_A, needs_B = needs_grad
    grad_hidden = flat_grad @ lora_B
    grad_B = flat_grad.t() @ hidden if needs_B else None
    if scaling != 1:
        grad_hidden = grad_hidden * scaling
    grad_A = grad_hidden.t() @ flat_x if needs_A else None
    grad_x = (flat_grad @ weight).addmm_(grad_hidden, lora_A) if needs_x else None
    return grad_x, grad_A, grad_B


def unflatten_output(flat_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A one-node layer's ``tokens x out`` output in the leading shape of its input ``x``.

    The reshape happens outside the autograd node: a view made inside a custom ``Function`` may not be
    modified in place afterwards, and models do modify a projection's output in place (Llama 4's
    MoE adds into its shared expert's ``down_proj`` output), which PEFT's layer allows.
    """
    return flat_out if x.dim() == 2 else flat_out.view(*x.shape[:-1], flat_out.shape[-1])


class LoraLinearFunction(torch.autograd.Function):
    """``x W^T + b + s (x A^T) B^T`` for a frozen ``W``/``b`` as one autograd node.

    Forward keeps ``x``, the three weights and the ``tokens x r`` hidden ``s x A^T``, what PEFT's
    layer keeps too, and returns the ``tokens x out`` output (:func:`unflatten_output` shapes it).
    Backward computes PEFT's gradients with the same products (:func:`lora_linear_backward`). The base
    weight and bias get no gradient: :meth:`FusedLoraLinear.forward` takes this path only while they
    are frozen. Backward is once differentiable: a second derivative (``create_graph=True``) raises,
    where PEFT's layer gives one (:func:`use_peft_layer_call` switches a model back to it).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        """The layer's output; see the class docstring."""
        flat_x = x.reshape(-1, x.shape[-1])
        out, hidden = lora_linear_forward(flat_x, weight, bias, lora_A, lora_B, scaling)
        ctx.save_for_backward(flat_x, weight, lora_A, lora_B, hidden)
        ctx.scaling, ctx.input_shape = scaling, x.shape
        return out  # tokens x out: see unflatten_output

    @staticmethod
    @once_differentiable  # saved x and hidden carry no graph: a second derivative would be silently wrong
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Gradients of ``x``, ``lora_A`` and ``lora_B`` (none for the frozen base)."""
        flat_x, weight, lora_A, lora_B, hidden = ctx.saved_tensors
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        needs = ctx.needs_input_grad
        grad_x, grad_A, grad_B = lora_linear_backward(
            flat_grad, flat_x, weight, lora_A, lora_B, hidden, ctx.scaling, (needs[0], needs[3], needs[4])
        )
        grad_x = grad_x.view(ctx.input_shape) if grad_x is not None else None
        return grad_x, None, None, grad_A, grad_B, None


class FusedLoraLinear(PeftLoraLinear):
    """PEFT's LoRA ``Linear`` whose adapter variant may compute the whole layer itself; every other call
    is PEFT's own ``forward``.

    A variant with a ``fused_forward(module, adapter, x)`` (:class:`FusedAddLoraVariant`, DoRA's)
    returns the layer's output from ``x`` in one autograd node, or ``None`` to leave the call to
    PEFT. It is asked only when what the node leaves out is absent: one active, unmerged adapter
    and no dropout; a plain frozen ``nn.Linear`` base, with no hooks on it or on the adapter's modules
    (LoRA-GA's gradient hooks, accelerate's offloading, DeepSpeed's partitioned weights, a user's
    forward hook on ``lora_A`` all need PEFT's calls); one dtype throughout
    and no autocast (whose casts PEFT's modules make op by op); no extra arguments (mixed-adapter
    batches).
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The variant's ``fused_forward`` where it computes what PEFT's forward would, else PEFT's forward."""
        name = None if args or kwargs else self._fusable_adapter(x)
        variants: dict[str, Any] = self.lora_variant  # fused_forward is our extension of PEFT's variant
        output = None if name is None else variants[name].fused_forward(self, name, x)
        return super().forward(x, *args, **kwargs) if output is None else output

    def _adapter_modules(self, name: str) -> list[nn.Module]:
        """The modules PEFT's forward calls for adapter ``name``; a hook on any of them needs that call."""
        modules = [self.base_layer, self.lora_A[name], self.lora_B[name], self.lora_dropout[name]]
        if name in self.lora_magnitude_vector:  # DoRA's
            modules.append(self.lora_magnitude_vector[name])
        return modules

    def _fusable_adapter(self, x: torch.Tensor) -> str | None:
        """The one active adapter when its variant has ``fused_forward`` and nothing stands in its way, else ``None``."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if getattr(self.lora_variant.get(name), "fused_forward", None) is None:
            return None
        if type(self.lora_dropout[name]) is not nn.Identity:
            return None
        base = self.base_layer
        if type(base) is not nn.Linear or any(has_hooks(m) for m in self._adapter_modules(name)):
            return None
        frozen = [base.weight] if base.bias is None else [base.weight, base.bias]
        factors = [cast(torch.Tensor, self.lora_A[name].weight), cast(torch.Tensor, self.lora_B[name].weight)]
        if any(t.requires_grad for t in frozen) or any(t.dtype != x.dtype for t in (*frozen, *factors)):
            return None
        if torch.is_autocast_enabled(x.device.type) or any(is_partitioned(t) for t in (*frozen, *factors)):
            return None
        return name


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its class's ``forward``: its own or global hooks, or a
    replaced ``forward`` (accelerate's offloading)."""
    from torch.nn.modules import module as torch_module

    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    hooks = (
        torch_module._global_forward_hooks,
        torch_module._global_forward_pre_hooks,
        torch_module._global_backward_hooks,
        torch_module._global_backward_pre_hooks,
    )
    return any(own) or any(hooks) or "forward" in vars(module)


def use_fused_add(model: nn.Module) -> int:
    """Give every plain LoRA adapter of ``model``'s PEFT linear layers :class:`FusedAddLoraVariant`,
    and PEFT's ``Linear`` layers the class :class:`FusedLoraLinear`; returns how many adapters were
    switched.

    Covered: PEFT's ``Linear`` (``nn.Linear`` and GPT-2's ``Conv1D`` bases) and its bitsandbytes
    ``Linear4bit`` (QLoRA), whose forwards call the variant the same way. Left as PEFT has them:
    adapters that already have a variant (DoRA), adapters with a trained ``lora_bias`` (PEFT scales
    the bias with the product, which scaling the hidden would not), and layers of other classes
    (8-bit bases, embeddings, convolutions).
    """
    classes = _fused_classes()
    layers: list[Any] = [m for m in model.modules() if type(m) in classes]  # PEFT types its attributes loosely
    count = 0
    for layer in layers:
        if type(layer) is PeftLoraLinear:
            layer.__class__ = FusedLoraLinear  # a subclass: PEFT's isinstance checks and methods all hold
        for name in layer.lora_A:
            if name in layer.lora_variant or layer.lora_bias.get(name, False):
                continue
            layer.lora_variant[name] = FusedAddLoraVariant()
            count += 1
    return count


def use_peft_layer_call(model: nn.Module) -> int:
    """Put every :class:`FusedLoraLinear` of ``model`` back on PEFT's ``Linear`` class, variants kept:
    each call then goes through PEFT's layer forward, as before :func:`use_fused_add`'s class swap
    (the one-node layer's ablation); returns how many layers were switched."""
    layers: list[nn.Module] = [m for m in model.modules() if type(m) is FusedLoraLinear]
    for layer in layers:
        layer.__class__ = PeftLoraLinear
    return len(layers)


def _fused_classes() -> tuple[type, ...]:
    """PEFT's layer classes whose forward hands a plain adapter's sum to its variant as ``Linear``'s does."""
    try:
        from peft.tuners.lora.bnb import Linear4bit  # defined only when bitsandbytes has 4-bit layers
    except ImportError:
        return (PeftLoraLinear, FusedLoraLinear)
    return (PeftLoraLinear, FusedLoraLinear, Linear4bit)
