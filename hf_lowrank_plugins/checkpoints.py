"""A transformers checkpoint folder a user names: checked before anything heavy, loaded at the dtype it
was saved in, every failure one line naming the fix."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from .errors import LowRankError
from .sources import load_model_config, no_remote_code

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (the names ``--dtype`` and ``--merged-dtype`` take)."""
    return DTYPE_NAMES[name]


def checkpoint_dtype(source: str | Path | Any) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in, from its folder's ``config.json`` or a config object
    (``dtype``, or the older ``torch_dtype``); float32 when it names none."""
    if isinstance(source, (str, Path)):
        try:
            raw = json.loads((Path(source) / "config.json").read_text())
        except (OSError, ValueError):
            return torch.float32
        value = raw.get("dtype") or raw.get("torch_dtype")
    else:
        value = getattr(source, "dtype", None) or getattr(source, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None) if value else None
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


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
