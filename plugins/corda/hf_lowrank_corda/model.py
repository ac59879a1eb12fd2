"""CorDA on PEFT's LoRA layers: PEFT's own covariance and decomposition, run when training begins.

PEFT's recipe runs ``preprocess_corda`` with a calibration callback before ``get_peft_model``. Here
the layers are attached as plain LoRA (B = 0), and at train start (the core's ``on_train_begin``)
PEFT's ``preprocess_corda`` runs on the base layers with the Trainer's own batches; the factors are
then set as PEFT's ``corda_init`` sets them, and the base becomes W - s*B@A by the LoRA family's
fp32 subtraction, which a resumed run repeats bit for bit from the checkpoint's slots
(:mod:`hf_lowrank_lora.resume`). The export is the residual family's: a rank-2r LoRA on the
original weights.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda
from torch import nn

from hf_lowrank_lora import attach_lora, lora_layers, residual
from hf_lowrank_lora.resume import ResumeSlots, subtract_factors
from hf_lowrank_plugins import ConfigError, IncompatibleError, is_quantized

from .config import CordaMethodConfig

logger = logging.getLogger(__name__)
#: Checkpoint slots of A0, B0 (``corda_A0``/``corda_B0``): a resumed run rebuilds W_res from them.
RESUME_SLOTS = ResumeSlots("corda")


def attach_corda(model: nn.Module, config: CordaMethodConfig, adapter: str = "default") -> PeftModel:
    """Plain LoRA layers (B = 0: the output is the base's) with CorDA's checkpoint slots."""
    residual.check_clean_base(model, "CorDA")
    task = str(getattr(getattr(config, "task_type", None), "value", getattr(config, "task_type", None)))
    if task not in ("None", "CAUSAL_LM"):
        # PEFT's covariance hook takes one sample's (tokens x in) rows: a pooler's one vector per sequence
        # would silently add a scalar to every entry, and decoder layers of a seq2seq model see other tokens
        raise IncompatibleError(
            f"CorDA on a {task} model is not supported: PEFT's covariance hook reads every target's input as one "
            "sequence's token rows (a classifier's pooler and a decoder's layers would be estimated wrongly); use a "
            "causal language model, or method 'lora'"
        )
    if is_quantized(model):
        raise IncompatibleError(
            "CorDA decomposes full-precision weights and rewrites them; a 4-bit base is not supported by this plugin "
            "(load the model in 16/32-bit, or use method 'qlora' for a 4-bit base)"
        )
    residual.check_untied_targets(model, config, "CorDA")
    peft_model = attach_lora(model, config)
    RESUME_SLOTS.add(peft_model, adapter)
    return peft_model


def calibration_samples(batches: Iterable[Mapping[str, Any]], count: int, device: torch.device) -> list[torch.Tensor]:
    """The sequences of the first ``count`` batches, one ``(1, tokens)`` tensor each, without padding.

    PEFT's covariance hook takes one sample's token rows per call (it squeezes the batch dimension),
    so the model runs on one sequence at a time, as PEFT's recipe does; padding (attention mask 0)
    is left out, which the hook could not tell from text.
    """
    samples: list[torch.Tensor] = []
    for index, batch in enumerate(batches):
        if index == count:
            break
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        for row in range(ids.shape[0]):
            sequence = ids[row] if mask is None else ids[row][mask[row].bool()]
            if sequence.numel():
                samples.append(sequence[None].to(device))
    if not samples:
        raise ConfigError("CorDA needs training batches to estimate each layer's input covariance; the data gave none")
    return samples


@torch.no_grad()
def initialise_corda(
    model: nn.Module, config: CordaMethodConfig, batches: Iterable[Mapping[str, Any]], adapter: str = "default"
) -> None:
    """PEFT's CorDA decomposition from the layer inputs of ``batches``; A, B as PEFT sets them; W <- W - s*B@A."""
    if not isinstance(model, PeftModel):
        raise IncompatibleError(f"CorDA expected the PeftModel returned by attach(), got {type(model).__name__}")
    layers = lora_layers(model, adapter)
    calibration = calibration_samples(batches, int(config.calibration_batches), next(model.parameters()).device)
    # PEFT finds its targets by name among plain linear layers: here, exactly the LoRA layers' bases, each at its rank
    bases = {f"{name}.base_layer": layer for name, layer in layers.items()}
    peft_config = LoraConfig(
        r=int(config.r),
        target_modules="|".join(re.escape(name) for name in bases),
        rank_pattern={re.escape(name): int(layer.r[adapter]) for name, layer in bases.items()},
        corda_config=CordaConfig(corda_method=config.corda_method),
    )

    def run_model() -> None:
        with model.disable_adapter():
            for input_ids in calibration:
                model(input_ids=input_ids)

    training = model.training
    model.eval()
    preprocess_corda(model, peft_config, run_model=run_model)
    model.train(training)
    for layer in layers.values():
        base = layer.get_base_layer()
        eigens = base.eigens
        # PEFT's corda_init: S scaled by 1/s, A = sqrt(S) V^T, B = U sqrt(S)
        values = eigens.S_WC / layer.scaling[adapter]
        lora_A = eigens.V_WC.t().mul(values.sqrt().view(-1, 1))
        lora_B = eigens.U_WC.mul(values.sqrt())
        weight_A, weight_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        weight_A.copy_(lora_A.to(weight_A.dtype))
        weight_B.copy_(lora_B.to(weight_B.dtype))
        del base.eigens
        subtract_factors(layer, weight_A, weight_B, layer.scaling[adapter])
        RESUME_SLOTS.record(layer, adapter, weight_A.detach(), weight_B.detach())
    residual.store_initial_factors(model, adapter)
    residual.mark_residual_base(model)
    logger.info(
        "CorDA (%s) initialised %d layers from %d sequences", config.corda_method, len(layers), len(calibration)
    )
