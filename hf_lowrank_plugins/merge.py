"""Merging a saved adapter into its base, from disk: what ``hf-lowrank merge`` runs, for Python callers too.

A safetensors base is read tensor by tensor under a meta-device skeleton, so one layer is in memory
at a time and models larger than RAM merge; other formats load whole (the same merge, more memory).
The merged checkpoint is written as an output set (staged, manifest last), in the base's dtype unless
``merged_dtype`` names another.
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from .cards import write_model_card
from .checkpoints import check_model_dir, checkpoint_dtype, load_causal_lm
from .errors import LowRankError
from .export import write_merged
from .loading import load_adapter, load_config, read_adapter_config
from .outputs import OutputSet
from .plan import meta_model
from .quantization import load_quantized
from .registry import Registry, get_registry
from .sources import load_model_config, load_tokenizer, resolve_adapter_base
from .streaming import CheckpointReader
from .types import QuantizationSettings


def merge_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path,
    base: str | Path | None = None,
    revision: str | None = None,
    merged_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    registry: Registry | None = None,
) -> Path:
    """Write ``adapter_dir`` merged into its base (the one it names, or ``base``: a folder or Hub id at
    ``revision``) to ``output_dir``; returns the base folder merged into.

    ``output_dir`` must be new, empty or (with ``overwrite``) an earlier output of this tool; every
    refusal is a :class:`~hf_lowrank_plugins.errors.LowRankError` raised before anything is written.
    """
    raw = read_adapter_config(adapter_dir)
    base_source = resolve_adapter_base(adapter_dir, raw, str(base) if base is not None else None, revision)
    base_dir = base_source.folder
    if not base_dir.exists():
        raise LowRankError(f"base model not found ({base_source.name!r}); pass --base DIR or a Hub id")
    outputs = OutputSet(
        output_dir, command="merge", overwrite=overwrite, inputs={"adapter": adapter_dir, "base model": base_dir}
    )
    outputs.check()
    check_model_dir(base_dir)
    stored_dtype = checkpoint_dtype(base_dir)
    source, model = None, None
    config = load_config(adapter_dir, registry)
    if (registry or get_registry()).method_for_config(config).requires_quantized_base:
        # the adapter was trained on deq(NF4(W)), not on W: the base is quantized as its training run did,
        # and the merge dequantizes it (what export's merged/ holds)
        model = load_quantized(base_dir, QuantizationSettings.from_config(config))
    elif CheckpointReader.available(base_dir):
        try:
            source = CheckpointReader(base_dir)
        except (OSError, ValueError, KeyError, struct.error) as exc:
            raise LowRankError(f"the weights in {base_dir} cannot be read ({exc}); the checkpoint is damaged") from None
        model = meta_model(load_model_config(base_dir), dtype=stored_dtype)
        if not {name for name, _ in model.named_parameters()} <= set(source.names()):
            source, model = None, None  # names transformers renames on load (older checkpoints)
    if model is None:
        model = load_causal_lm(base_dir, stored_dtype)
    adapted = load_adapter(model, adapter_dir, registry=registry)
    has_tokenizer = any((base_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(base_dir) if has_tokenizer else None
    with outputs:
        write_merged(
            adapted.model, outputs.stage, tokenizer=tokenizer, dtype=merged_dtype or stored_dtype, source=source
        )
        write_model_card(outputs.stage, "merged", adapted.method, adapted.config, {"model": str(base_dir)})
        outputs.commit(info={"adapter": str(adapter_dir), "base": str(base_dir)})
    return base_dir
