"""Attach EVA on PEFT's LoRA layers and run PEFT's own EVA initialisation at the start of training.

PEFT computes everything (``initialize_lora_eva_weights``: incremental SVD of each target layer's
inputs, rank redistribution by explained variance, layers re-created at their new ranks). What a
Trainer needs and PEFT leaves to the user is here:

- The initialisation runs after the Trainer built its optimizer, and a layer whose rank changed
  holds new parameters: :func:`swap_optimizer_parameters` puts them in the optimizer's groups in place
  of the old ones (the state is still empty at that point, so nothing else refers to them).
- PEFT cycles the data until every layer's SVD converged, forever on data that cannot make it
  converge: :class:`CappedBatches` stops after ``svd_max_batches`` with the remedy.
- A resumed run attaches at rank ``r`` everywhere, while its checkpoint holds the redistributed
  ranks: :func:`reshape_to_checkpoint` re-creates the layers at the checkpoint's ranks (through the
  same PEFT function) before the Trainer loads the weights into them.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import MethodType
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.eva import (
    SVDHook,
    initialize_lora_eva_weights,
    prepare_layer_inputs_fn_language_modeling,
    prepare_model_inputs_fn_language_modeling,
)
from safetensors import safe_open
from torch import nn

from hf_lowrank_lora import attach_lora
from hf_lowrank_plugins import ConfigError, IncompatibleError

from .config import EvaMethodConfig

logger = logging.getLogger(__name__)
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def attach_eva(model: nn.Module, config: EvaMethodConfig) -> PeftModel:
    """LoRA layers at rank ``r`` with B = 0 (so the output is the base's) until training begins."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        # PEFT selects the tokens of every layer's inputs by the encoder's mask; decoder layers see other tokens
        raise IncompatibleError(
            "EVA on an encoder-decoder model (T5) is not supported: PEFT's EVA selects each layer's input tokens by "
            "the encoder's attention mask; use a decoder-only or encoder model, or method 'lora'"
        )
    with warnings.catch_warnings():
        # PEFT suggests meta-device A for EVA; the Trainer's optimizer is built before EVA runs and needs real ones
        warnings.filterwarnings("ignore", message=r"lora with eva initialization used with low_cpu_mem_usage")
        peft_model = attach_lora(model, config)
    # the Trainer resumes through model.load_adapter(checkpoint, ...), before it builds the optimizer
    peft_model.load_adapter = MethodType(_load_adapter_at_saved_ranks, peft_model)  # type: ignore[method-assign]
    return peft_model


def _load_adapter_at_saved_ranks(self: PeftModel, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
    """``PeftModel.load_adapter`` after re-creating the layers at the ranks the saved EVA adapter has."""
    if adapter_name in self.peft_config and isinstance(model_id, (str, Path)):
        reshape_to_checkpoint(self, Path(model_id), adapter_name)
    return type(self).load_adapter(self, model_id, adapter_name, *args, **kwargs)


class CappedBatches:
    """The training batches for PEFT's EVA: cycled, as dicts, at most ``limit`` of them.

    PEFT iterates ``cycle(dataloader)`` until every layer's SVD converged; ``itertools.cycle`` replays
    the first pass it cached, so on data that never converges the loop never ends. Cycling here
    instead, and raising at the limit, keeps the batches PEFT sees the same and ends the loop.
    """

    def __init__(self, batches: Iterable[Mapping[str, Any]], limit: int, tau: float, model: nn.Module) -> None:
        self.batches, self.limit, self.tau, self.model = batches, limit, tau, model

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]  # PEFT refuses an empty loader by its length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        served = 0
        while True:
            empty = True
            for batch in self.batches:
                empty = False
                if served == self.limit:
                    raise ConfigError(self._not_converged())
                served += 1
                yield dict(batch)  # PEFT's input preparation takes plain dicts only
            if empty:
                return

    def _not_converged(self) -> str:
        """One line: which layers' SVDs are still running, and the remedy for each kind."""
        running = {
            name: hook
            for name, module in self.model.named_modules()
            for hook in module._forward_hooks.values()
            if isinstance(hook, SVDHook)
        }
        # PEFT skips a batch giving a layer fewer rows than components: such a layer never starts
        starved = sorted(name for name, hook in running.items() if not hasattr(hook.svd, "components_"))
        if starved:
            components = running[starved[0]].n_components
            return (
                f"EVA's SVD never started on {len(starved)} layer(s) (e.g. '{starved[0]}'): a batch gives them fewer "
                f"rows than the {components} components asked (r * rho; a classifier's pooler sees one row per "
                "sequence); raise the batch size, lower rho, or leave them out with exclude_modules"
            )
        return (
            f"EVA's SVD of the layer inputs did not converge within {self.limit} batches on {len(running)} layer(s) "
            f"(e.g. '{next(iter(running), '?')}', tau={self.tau}); lower tau, raise svd_max_batches, or train with "
            "more tokens per batch"
        )


def token_positions(model_input: Mapping[str, Any], peft_config: Any) -> torch.Tensor:
    """PEFT's choice of the tokens whose layer inputs enter the SVD, for sequence classifiers too.

    PEFT keeps the attention mask's tokens and, with ``use_label_mask``, drops those labelled -100.
    A classifier's labels are one per sequence, which PEFT would compare with the tokens and fail:
    only the attention mask applies there.
    """
    labels, ids = model_input.get("labels"), model_input.get("input_ids")
    if labels is not None and ids is not None and labels.shape != ids.shape:
        model_input = {key: value for key, value in model_input.items() if key != "labels"}
    return prepare_model_inputs_fn_language_modeling(dict(model_input), peft_config)


def layer_rows(layer_input: Any, positions: torch.Tensor, layer_name: str) -> torch.Tensor:
    """The rows of a layer's input that enter its SVD: PEFT's selected tokens, or every row of a layer
    that sees one vector per sequence (a classifier's pooler, which PEFT would index by token and fail)."""
    hidden = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 2:
        return hidden.contiguous()  # the pooler's input is a strided slice; PEFT hashes it through view()
    return prepare_layer_inputs_fn_language_modeling(layer_input, positions, layer_name)


def initialise_eva(
    model: nn.Module,
    config: EvaMethodConfig,
    batches: Iterable[Mapping[str, Any]],
    optimizer: torch.optim.Optimizer | None,
    adapter: str = "default",
) -> None:
    """PEFT's EVA initialisation on ``batches``; the optimizer then trains the layers' new parameters.

    Re-created layers get the trainable dtype the old ones had (PEFT's ``autocast_adapter_dtype``
    keeps adapters in fp32 on a bf16 base; a re-created layer would take the base's dtype).
    """
    if not isinstance(model, PeftModel):
        raise IncompatibleError(f"EVA expected the PeftModel returned by attach(), got {type(model).__name__}")
    before = {name: p for name, p in model.named_parameters() if p.requires_grad}
    initialize_lora_eva_weights(
        model,
        dataloader=CappedBatches(batches, config.svd_max_batches, config.tau, model),
        prepare_model_inputs_fn=token_positions,
        prepare_layer_inputs_fn=layer_rows,
        adapter_name=adapter,
        show_progress_bar=False,
    )
    after = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for name, param in after.items():
        old = before.get(name)
        if old is not None and param is not old and param.dtype != old.dtype:
            param.data = param.data.to(old.dtype)
    if optimizer is not None:
        swap_optimizer_parameters(optimizer, before, after)
    ranks = sorted(
        {layer.r[adapter] for layer in model.modules() if isinstance(layer, LoraLayer) and adapter in layer.r}
    )
    logger.info("EVA initialised the adapter from the layer inputs; ranks now %s", ranks)


def swap_optimizer_parameters(
    optimizer: torch.optim.Optimizer, before: Mapping[str, nn.Parameter], after: Mapping[str, nn.Parameter]
) -> int:
    """Replace, in ``optimizer``'s groups, each parameter of ``before`` by the one of the same name in
    ``after`` (dropping it where the layer went, at rank 0); returns how many were replaced."""
    new = set(after) - set(before)
    if new:
        raise IncompatibleError(f"EVA created trainable parameters the optimizer never saw: {sorted(new)[:3]}")
    if any(optimizer.state.values()):
        raise IncompatibleError(
            "EVA re-creates LoRA layers at their new ranks, but the optimizer already holds state for the old ones; "
            "run the initialisation before the first optimizer step"
        )
    replacement = {id(param): after.get(name) for name, param in before.items()}
    swapped = 0
    for group in optimizer.param_groups:
        params = []
        for param in group["params"]:
            new_param = replacement.get(id(param), param)
            swapped += new_param is not param
            if new_param is not None:
                params.append(new_param)
        group["params"] = params
    return swapped


def _width(layer: LoraLayer) -> int:
    """The input width of a LoRA layer (PEFT types it optional; every layer it created has one)."""
    if layer.in_features is None:
        raise IncompatibleError(f"EVA cannot size a {type(layer).__name__} without in_features")
    return int(layer.in_features)


def reshape_to_checkpoint(model: PeftModel, checkpoint: Path, adapter: str = "default") -> bool:
    """Re-create ``model``'s LoRA layers at the ranks of the EVA adapter saved in ``checkpoint``
    (layers it does not have are removed, as EVA removes a layer given rank 0). Returns whether any
    layer changed; a folder without safetensors adapter weights is left to PEFT's loader."""
    weights = checkpoint / ADAPTER_WEIGHTS
    if not weights.is_file():
        return False
    saved_ranks: dict[str, int] = {}
    with safe_open(str(weights), framework="pt") as stored:
        for key in stored.keys():  # noqa: SIM118  # safe_open is not a Mapping
            if key.endswith(".lora_A.weight"):
                saved_ranks[key.removesuffix(".lora_A.weight")] = int(stored.get_slice(key).get_shape()[0])
    layers = {
        name: layer for name, layer in model.named_modules() if isinstance(layer, LoraLayer) and adapter in layer.r
    }
    if all(saved_ranks.get(name) == layer.r[adapter] for name, layer in layers.items()):
        return False
    config_file = checkpoint / "adapter_config.json"
    saved_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if saved_config.get("init_lora_weights", "eva") != "eva":
        return False  # not an EVA adapter: PEFT's loader reports the mismatch
    # PEFT's own loading of an EVA state: the same rank, alpha and removal rules as the fresh run
    shapes = {name: torch.zeros(saved_ranks.get(name, 0), _width(layer)) for name, layer in layers.items()}
    initialize_lora_eva_weights(model, eva_state_dict=shapes, adapter_name=adapter, show_progress_bar=False)
    logger.info("EVA: layers re-created at the %d ranks of %s before loading it", len(saved_ranks), checkpoint)
    return True
