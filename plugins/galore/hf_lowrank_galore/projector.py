"""GaLore's gradient projector as pure functions over plain tensors.

galore-torch keeps a ``GaLoreProjector`` *object* in the optimizer state, which is why its
checkpoints cannot be read back with ``torch.load(weights_only=True)``. Here the projector is just
its orthonormal matrix (or pair, for ``full``) stored as tensors under ``optimizer.state[p]``; which
side it acts on is a pure function of the weight's shape and ``proj_type``, so nothing else needs
to be saved.

Numerics follow galore-torch 1.0 on purpose (the equivalence test relies on it): the SVD runs in
float32 (``torch.linalg.svd(full_matrices=False)``) and the kept factor is cast back to the
gradient's dtype.
"""

from __future__ import annotations

import torch

from .config import PROJ_TYPES

#: State keys holding the projector. ``full`` uses both, the other sides use ``proj`` only.
PROJ_KEY = "proj"
PROJ_RIGHT_KEY = "proj_right"


def projection_side(shape: torch.Size | tuple[int, ...], proj_type: str) -> str:
    """Which side a weight of ``shape`` (out x in) is projected on: ``left``, ``right`` or ``full``.

    ``std`` projects the smaller dimension away (right when m >= n, so the state is m x r), which
    minimises the moments' size; ``reverse_std`` does the opposite.
    """
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {', '.join(PROJ_TYPES)}, got {proj_type!r}")
    if len(shape) != 2:
        raise ValueError(f"GaLore projects 2-D weights only, got shape {tuple(shape)}")
    tall = shape[0] >= shape[1]
    if proj_type == "std":
        return "right" if tall else "left"
    if proj_type == "reverse_std":
        return "left" if tall else "right"
    return proj_type


def low_rank_shape(shape: torch.Size | tuple[int, ...], rank: int, side: str) -> tuple[int, int]:
    """Shape of the projected gradient (and of the Adam moments) for a weight of ``shape``."""
    m, n = int(shape[0]), int(shape[1])
    return {"right": (m, rank), "left": (rank, n), "full": (rank, rank)}[side]


def _compact(view: torch.Tensor) -> torch.Tensor:
    """A copy of an SVD factor slice that owns only its own elements, in the same memory order.

    LAPACK returns column-major factors; a slice ``u[:, :r]`` would keep the whole factor alive
    (and be saved whole in checkpoints). Copying while keeping the column-major order keeps the
    matmuls bit-identical to galore-torch, which multiplies by the slices directly.
    """
    if view.dim() == 2 and view.stride(0) == 1 and view.size(0) > 1:
        return view.t().contiguous().t()
    return view.contiguous()


def compute_projection(grad: torch.Tensor, rank: int, side: str) -> dict[str, torch.Tensor]:
    """The projector for ``grad`` from its truncated SVD, as state entries (plain tensors).

    ``right``: P = Vh[:r] (r x n), R = G P^T.  ``left``: P = U[:, :r] (m x r), R = P^T G.
    ``full``: both. The SVD is done in float32 whatever the gradient dtype (bf16 SVD is not
    supported on every backend and loses orthogonality), then cast back like galore-torch does.
    """
    matrix = grad if grad.dtype == torch.float32 else grad.float()
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    if side == "right":
        return {PROJ_KEY: _compact(vh[:rank, :].to(grad.dtype))}
    if side == "left":
        return {PROJ_KEY: _compact(u[:, :rank].to(grad.dtype))}
    if side == "full":
        return {PROJ_KEY: _compact(u[:, :rank].to(grad.dtype)), PROJ_RIGHT_KEY: _compact(vh[:rank, :].to(grad.dtype))}
    raise ValueError(f"unknown projection side {side!r}")


def project(grad: torch.Tensor, state: dict, side: str) -> torch.Tensor:
    """Project a full gradient into the low-rank space with the projector held in ``state``."""
    p = state[PROJ_KEY]
    if side == "right":
        return grad @ p.t()
    if side == "left":
        return p.t() @ grad
    return (p.t() @ grad) @ state[PROJ_RIGHT_KEY].t()


def project_back(low_rank: torch.Tensor, state: dict, side: str, scale: float) -> torch.Tensor:
    """Map a low-rank update back to the weight's shape and multiply by ``scale``."""
    p = state[PROJ_KEY]
    if side == "right":
        full = low_rank @ p
    elif side == "left":
        full = p @ low_rank
    else:
        full = (p @ low_rank) @ state[PROJ_RIGHT_KEY]
    return full * scale
