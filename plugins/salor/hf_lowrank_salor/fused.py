"""Inference module: sparse base GEMMs plus fused low-rank adapters.

Projections that read the same input (q, k, v of an attention block; gate, up of an MLP) have
their A factors concatenated, so the adapter's down-projection is ONE GEMM for the group::

    z   = x @ [A_q ; A_k ; A_v]^T                       (one GEMM, r_q + r_k + r_v outputs)
    y_i = base_i(x) + s_i * z[:, slice_i] @ B_i^T       (addmm into the base output)

which equals the unfused ``base_i(x) + s_i * (x @ A_i^T) @ B_i^T`` up to float rounding (the same
products, summed in the same order per output). With ``fuse_base=True`` the base weights of the
group are concatenated as well (one base GEMM per group; the outputs are then copied to
contiguous slices, because attention reshapes them with ``view``).

The base of each projection can run as:

* ``"dense"``  the pruned W with its zeros (what every BLAS runs fastest on a CPU at 50%);
* ``"csr"``    ``torch.sparse_csr`` (MKL sparse on CPU) - skips the zeros, pays for indices;
* ``"2:4"``    ``torch.sparse.to_sparse_semi_structured`` (CUDA sparse tensor cores; needs a
  2:4 pruned base, fp16/bf16, and a GPU of compute capability >= 8.0).

The HF attention/MLP code calls each projection separately; a group computes every member's
output on the first call and hands the others out from a one-shot cache keyed on the input
tensor's identity and version, falling back to a fresh computation whenever the input differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import PeftModel
from torch import nn

from hf_lowrank_lora import lora_layers
from hf_lowrank_plugins import ConfigError, IncompatibleError
from hf_lowrank_plugins.targets import is_transposed

from .export import pruned_base_copy
from .model import apply_adapter_masks

DEFAULT_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
BASE_FORMATS = ("dense", "csr", "2:4")


def sparse_base(weight: torch.Tensor, base_format: str) -> torch.Tensor:
    """``weight`` in the storage ``base_format`` asks for (see the module docstring)."""
    if base_format == "dense":
        return weight.detach().contiguous()
    if base_format == "csr":
        return weight.detach().to_sparse_csr()
    if base_format == "2:4":
        if weight.device.type != "cuda":
            raise IncompatibleError(
                "base_format='2:4' uses torch's semi-structured sparse kernels, which run on CUDA only; "
                "on CPU use 'dense' or 'csr'"
            )
        from torch.sparse import to_sparse_semi_structured

        return to_sparse_semi_structured(weight.detach().contiguous())
    raise ConfigError(f"base_format must be one of {', '.join(BASE_FORMATS)}, got {base_format!r}")


def base_matmul(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x2d @ weight.T`` for a dense, CSR or semi-structured ``weight`` (x2d is (tokens, in))."""
    if weight.layout == torch.sparse_csr:
        return torch.sparse.mm(weight, x2d.t()).t()
    return torch.nn.functional.linear(x2d, weight)


class SparseLowRankLinear(nn.Module):
    """One projection: ``x @ W_s^T + bias + s * (x @ A^T) @ B^T`` with W_s in ``base_format``."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        A: torch.Tensor | None,
        B: torch.Tensor | None,
        scaling: float = 1.0,
        base_format: str = "dense",
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = sparse_base(weight, base_format)
        self.bias = None if bias is None else bias.detach()
        self.A = None if A is None else A.detach().contiguous()
        self.B = None if B is None else B.detach().contiguous()
        self.scaling = float(scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base GEMM, then the adapter added with one ``addmm``."""
        x2d = x.reshape(-1, self.in_features)
        y = base_matmul(x2d, self.weight)
        if self.bias is not None:
            y = y + self.bias
        if self.A is not None:
            y = torch.addmm(y, x2d @ self.A.t(), self.B.t(), alpha=self.scaling)  # type: ignore[union-attr]  # the factors are set for every layer this kernel runs on
        return y.reshape(*x.shape[:-1], self.out_features)


class FusedGroup(nn.Module):
    """Projections of one input: one GEMM for all their A factors (and optionally all their bases)."""

    def __init__(
        self,
        weights: Sequence[torch.Tensor],
        biases: Sequence[torch.Tensor | None],
        factors: Sequence[tuple[torch.Tensor, torch.Tensor, float] | None],
        base_format: str = "dense",
        fuse_base: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = int(weights[0].shape[1])
        if any(int(w.shape[1]) != self.in_features for w in weights):
            raise ConfigError("projections fused into one group must read inputs of the same size")
        self.out_sizes = [int(w.shape[0]) for w in weights]
        self.fuse_base = fuse_base
        if fuse_base:
            self.weights = [sparse_base(torch.cat([w.detach() for w in weights]), base_format)]
        else:
            self.weights = [sparse_base(w, base_format) for w in weights]
        self.biases = [None if b is None else b.detach() for b in biases]
        adapted = [f for f in factors if f is not None]
        self.A_cat = torch.cat([A.detach() for A, _, _ in adapted]).contiguous() if adapted else None
        self.adapters: list[tuple[int, int, torch.Tensor, float] | None] = []
        start = 0
        for f in factors:
            if f is None:
                self.adapters.append(None)
                continue
            A, B, s = f
            self.adapters.append((start, start + A.shape[0], B.detach().contiguous(), float(s)))
            start += A.shape[0]
        self._cache: tuple[torch.Tensor, int, list[torch.Tensor], set[int]] | None = None

    def compute(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every member's output for input ``x``."""
        x2d = x.reshape(-1, self.in_features)
        if self.fuse_base:
            ys = [y.contiguous() for y in base_matmul(x2d, self.weights[0]).split(self.out_sizes, dim=-1)]
        else:
            ys = [base_matmul(x2d, w) for w in self.weights]
        z = x2d @ self.A_cat.t() if self.A_cat is not None else None
        outs = []
        for y, bias, adapter in zip(ys, self.biases, self.adapters, strict=False):
            if bias is not None:
                y = y + bias
            if adapter is not None:
                start, stop, B, s = adapter
                y = torch.addmm(y, z[:, start:stop], B.t(), alpha=s)  # type: ignore[index]  # the factors are set for every layer this kernel runs on
            outs.append(y.reshape(*x.shape[:-1], y.shape[-1]))
        return outs

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member ``index``'s output, computing the whole group once per input tensor."""
        cache = self._cache
        if cache is None or cache[0] is not x or cache[1] != x._version or index not in cache[3]:
            cache = (x, x._version, self.compute(x), set(range(len(self.out_sizes))))
        cache[3].discard(index)
        # drop the cache as soon as every member was served: it must not keep activations alive
        self._cache = cache if cache[3] else None
        return cache[2][index]


class FusedMember(nn.Module):
    """Stands in for one projection of a :class:`FusedGroup` where the model calls it."""

    def __init__(self, group: FusedGroup, index: int) -> None:
        super().__init__()
        self.group, self.index = group, index
        self.out_features, self.in_features = group.out_sizes[index], group.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This member's slice of the group output."""
        return self.group.output(x, self.index)


def _factors(model: PeftModel, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, s) of every LoRA layer, by the module name it has in the plain base model."""
    prefix = "base_model.model."
    out = {}
    for name, layer in lora_layers(model, adapter).items():
        key = name[len(prefix) :] if name.startswith(prefix) else name
        out[key] = (
            layer.lora_A[adapter].weight.detach().float(),
            layer.lora_B[adapter].weight.detach().float(),
            float(layer.scaling[adapter]),
        )
    return out


@torch.no_grad()
def build_inference_model(
    model: PeftModel,
    fuse: bool | None = None,
    base_format: str = "dense",
    fuse_base: bool = False,
    groups: Sequence[Sequence[str]] = DEFAULT_GROUPS,
    adapter: str = "default",
) -> nn.Module:
    """A plain (adapter-free) copy of ``model`` whose adapted projections compute sparse base + adapter.

    Args:
        model: a SALOR ``PeftModel`` (trained or not); it is not modified.
        fuse: fuse the adapters of each group in ``groups`` (default: the config's ``fuse``).
        base_format: ``"dense"``, ``"csr"`` or ``"2:4"`` (CUDA only), see the module docstring.
        fuse_base: also concatenate the base weights of a group into one GEMM.
        groups: sibling module names that read the same input.
        adapter: the adapter to build from.

    Returns:
        The model, in eval mode and the dtype of the base (adapter factors are cast to it).
    """
    if base_format not in BASE_FORMATS:
        raise ConfigError(f"base_format must be one of {', '.join(BASE_FORMATS)}, got {base_format!r}")
    if not isinstance(model, PeftModel):
        raise IncompatibleError(f"expected a SALOR PeftModel, got {type(model).__name__}")
    if fuse is None:
        fuse = bool(getattr(model.peft_config[adapter], "fuse", True))
    apply_adapter_masks(model, adapter)
    factors = _factors(model, adapter)
    plain = pruned_base_copy(model).eval()
    dtype = next(p.dtype for p in plain.parameters() if p.is_floating_point())
    factors = {k: (A.to(dtype), B.to(dtype), s) for k, (A, B, s) in factors.items()}
    modules = dict(plain.named_modules())
    done: set[str] = set()
    if fuse:
        for parent_name, parent in list(modules.items()):
            for members in groups:
                names = [f"{parent_name}.{m}" if parent_name else m for m in members]
                linears = [modules.get(n) for n in names]
                if not all(isinstance(lin, nn.Linear) for lin in linears) or not any(n in factors for n in names):
                    continue
                group = FusedGroup(
                    [lin.weight for lin in linears],  # type: ignore[union-attr]  # every entry is a Linear here
                    [lin.bias for lin in linears],  # type: ignore[union-attr]  # every entry is a Linear here
                    [factors.get(n) for n in names],
                    base_format=base_format,
                    fuse_base=fuse_base,
                )
                for i, member in enumerate(members):
                    setattr(parent, member, FusedMember(group, i))
                parent.add_module(f"salor_fused_{'_'.join(members)}", group)
                done.update(names)
    for name, (A, B, s) in factors.items():
        if name in done:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else plain
        linear = getattr(parent, child)
        # GPT-2's Conv1D stores its weight (in, out); the adapter's B A is (out, in), as for nn.Linear
        weight = linear.weight.t() if is_transposed(linear) else linear.weight
        setattr(parent, child, SparseLowRankLinear(weight, linear.bias, A, B, s, base_format=base_format))
    return plain
