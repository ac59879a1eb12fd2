"""Turn a trained PiSSA adapter into a plain LoRA adapter relative to the ORIGINAL base weights.

W = W_res + s*B0@A0 and the trained model is W_res + s*B@A, so the trained model equals
W + s*(B@A - B0@A0) = W + s*[B | -B0] @ [A ; A0]: a rank-2r LoRA. Doubling alpha (sqrt(2) x with
rsLoRA, where s = alpha / sqrt(r)) keeps s unchanged at rank 2r.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from hf_lowrank_lora import LoraMethodConfig
from peft import LoraConfig, PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from hf_lowrank_plugins import LowRankError, atomic_directory

from .model import initial_factors


def converted_lora_config(config: LoraConfig) -> LoraMethodConfig:
    """The config of the rank-2r LoRA equivalent to ``config``'s PiSSA adapter (same scaling s)."""
    factor = math.sqrt(2) if config.use_rslora else 2
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(LoraMethodConfig) if f.init and hasattr(config, f.name)}

    def scaled(alpha: float) -> float:
        value = alpha * factor
        return int(value) if float(value).is_integer() else value

    fields.update(
        r=2 * config.r,
        lora_alpha=scaled(config.lora_alpha),
        # every layer doubles its rank and scales its alpha alike, so every layer keeps its s
        rank_pattern={k: 2 * v for k, v in (config.rank_pattern or {}).items()},
        alpha_pattern={k: scaled(v) for k, v in (config.alpha_pattern or {}).items()},
        init_lora_weights=True,  # loading must not run an SVD on (and mutate) the original base
        hf_lowrank_method="lora",
    )
    return LoraMethodConfig(**fields)


def converted_lora_state_dict(model: PeftModel, adapter: str = "default") -> dict[str, torch.Tensor]:
    """PEFT's adapter state dict of ``model`` with every A -> [A ; A0] and B -> [B | -B0]."""
    state = {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}
    factors = initial_factors(model, adapter)
    converted = set()
    for name, (a0, b0) in factors.items():
        key_a, key_b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        state[key_a] = torch.cat([state[key_a], a0.to(state[key_a].dtype)], dim=0)
        state[key_b] = torch.cat([state[key_b], -b0.to(state[key_b].dtype)], dim=1)
        converted |= {key_a, key_b}
    missing = sorted(k for k in state if (".lora_A." in k or ".lora_B." in k) and k not in converted)
    if missing:
        raise LowRankError(
            f"no PiSSA initial factors for {len(missing)} LoRA weight(s), e.g. {missing[0]}: the model was not "
            "attached with method 'pissa' in this process; attach PiSSA again to the original base to export"
        )
    return {k: v.contiguous() for k, v in state.items()}


def save_portable_adapter(model: PeftModel, directory: str | Path, adapter: str = "default") -> Path:
    """Write the converted rank-2r LoRA that plain PEFT loads onto the original base, atomically."""
    if not isinstance(model, PeftModel):
        raise LowRankError(f"expected the PeftModel returned by attach(), got {type(model).__name__}")
    directory = Path(directory)
    config = converted_lora_config(model.peft_config[adapter])
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model.get_base_model(), "name_or_path", None) or None
    config.inference_mode = True
    state = converted_lora_state_dict(model, adapter)
    with atomic_directory(directory) as tmp:
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory
