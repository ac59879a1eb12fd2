"""What the application checks of a model beyond its folder (the library's :mod:`~hf_lowrank_plugins.checkpoints`):
the positions it reads, and whether this machine computes in bfloat16."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import LowRankError


def position_limit(config: Any, learned_only: bool = False) -> int | None:
    """How many positions the model reads: GPT-2's ``n_positions`` (learned embeddings: a hard limit), else
    ``max_position_embeddings`` (for rotary models the trained context, which ``learned_only`` skips)."""
    limit = getattr(config, "n_positions", None)
    rotary = any(hasattr(config, a) for a in ("rope_theta", "rope_scaling", "rope_parameters"))
    if limit is None and not (learned_only and rotary):
        limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) else None


def check_bf16() -> None:
    """Refuse ``--bf16`` on a machine that cannot compute in bfloat16, naming the fix."""
    from transformers.utils.import_utils import is_torch_bf16_available_on_device

    available = is_torch_bf16_available_on_device("cuda" if torch.cuda.is_available() else "cpu")
    if not available:
        where = "this GPU" if torch.cuda.is_available() else "this CPU's torch build"
        raise LowRankError(f"--bf16: {where} cannot compute in bfloat16; drop --bf16 (or use --dtype float16 on a GPU)")
