"""The base model a user brings: checked before anything heavy, loaded at the dtype it was saved in."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from ..errors import LowRankError
from ..sources import load_model_config, no_remote_code

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (the names ``--dtype`` takes)."""
    return DTYPE_NAMES[name]


def check_model_dir(path: str | Path) -> Path:
    """``path`` as an absolute causal LM checkpoint folder, or one line saying what is wrong with it.

    Checked without loading weights: a folder, a readable ``config.json`` naming a causal LM
    architecture transformers knows, and weight files.
    """
    folder = Path(path)
    if not folder.exists():
        raise LowRankError(f"model not found: {path}; pass a transformers checkpoint folder (config.json + weights)")
    if not folder.is_dir():
        raise LowRankError(f"--model {path} is a file; pass the checkpoint folder that holds config.json")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise LowRankError(
            f"{path} is not a transformers checkpoint (no config.json); pass the folder save_pretrained wrote"
        )
    try:
        raw = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise LowRankError(f"{config_file} is not valid JSON ({exc}); the checkpoint is damaged") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = load_model_config(folder)
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    saved_as = raw.get("architectures") or []
    # a checkpoint saved as an encoder (BertModel) would load as a causal LM head on top of it: refuse
    is_causal = (
        any(a in causal_classes for a in saved_as)
        if saved_as
        else config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    if not is_causal:
        arch = ", ".join(saved_as or [config.model_type])
        raise LowRankError(
            f"{path} is a {arch}, not a causal language model: the CLI trains causal LMs; use the Python API "
            "(attach) for encoder-decoder and classification models"
        )
    if not any((folder / name).is_file() for name in WEIGHT_FILES) and not list(folder.glob("*.safetensors")):
        raise LowRankError(f"{path} has a config.json but no weights (model.safetensors or pytorch_model.bin)")
    # absolute: the path is recorded as the adapter's base (base_model_name_or_path), and a relative one
    # would name whatever folder of that name a later command's working directory holds
    return folder.resolve()


def checkpoint_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype a checkpoint was saved in (its config's ``dtype``/``torch_dtype``; float32 when it names none)."""
    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return DTYPE_NAMES.get(str(name).removeprefix("torch."), torch.float32)


def load_causal_lm(model_dir: str | Path, dtype: torch.dtype) -> Any:
    """The checkpoint as a causal LM at ``dtype``, or one line naming what failed (damaged weights, ...)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=False)
    except pickle.UnpicklingError:
        raise LowRankError(
            f"cannot load the model in {model_dir}: its .bin weights hold Python objects that torch's safe loader "
            "refuses to unpickle; save the model as safetensors (save_pretrained) from a source you trust"
        ) from None
    except SafetensorError as exc:
        raise LowRankError(
            f"cannot load the model in {model_dir}: a safetensors file is damaged ({' '.join(str(exc).split())[:120]}); "
            "download or save the checkpoint again"
        ) from None
    except (OSError, ValueError, RuntimeError) as exc:
        refusal = no_remote_code(exc, model_dir, "model")
        if refusal is not None:
            raise refusal from None
        message = " ".join(str(exc).split())[:240]
        raise LowRankError(f"cannot load the model in {model_dir}: {message}") from None


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
