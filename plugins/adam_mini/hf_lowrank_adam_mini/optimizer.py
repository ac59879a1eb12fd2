"""The official Adam-mini (``adam_mini.Adam_mini`` 1.1.1) built from the Trainer's arguments, and its state size.

The update is the package's own, unchanged; what is set here is what the package leaves to its user:
the hyperparameters come from ``TrainingArguments``, the head geometry from the model's config, and
two of the package's machine assumptions are corrected (see :func:`build_adam_mini`).
"""

from __future__ import annotations

from typing import Any

from adam_mini import Adam_mini
from torch import nn

from hf_lowrank_plugins import ConfigError

from .config import AdamMiniConfig


def geometry(model: nn.Module, config: AdamMiniConfig) -> dict[str, int]:
    """``dim``, ``n_heads``, ``n_kv_heads`` and ``head_dim``: the config's fields, else the model config's."""
    model_config = getattr(model, "config", None)

    def read(name: str) -> int | None:
        value = getattr(config, name, None)
        return int(value) if value is not None else getattr(model_config, name, None)

    dim, heads = read("hidden_size"), read("num_attention_heads")
    if dim is None or heads is None:
        raise ConfigError(
            "Adam-mini sizes its query/key blocks by the model's width and heads, which this model's config does not "
            "name (hidden_size, num_attention_heads): set them with --set hidden_size=N --set num_attention_heads=N"
        )
    kv_heads = read("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ConfigError(
            f"Adam-mini needs the query heads ({heads}) to be a multiple of the key/value heads ({kv_heads})"
        )
    head_dim = read("head_dim") or dim // heads
    return {"dim": int(dim), "n_heads": int(heads), "n_kv_heads": int(kv_heads), "head_dim": int(head_dim)}


def build_adam_mini(model: nn.Module, config: AdamMiniConfig, args: Any) -> Adam_mini:
    """The package's optimizer over ``model``'s trainable parameters, with the Trainer's hyperparameters.

    Three corrections of the package's assumptions; none changes an update the package computes:

    - ``world_size``: the package counts the machine's GPUs and, above one, all-reduces the second
      moments of whole-block parameters across processes, which is for parameters sharded over
      processes (FSDP, ZeRO-3). Neither runs here (refused), and DDP replicas hold the same averaged
      gradients already; counting GPUs also made a single process on a multi-GPU machine call
      collectives that were never initialised. It is 1.
    - ``head_numel``: the package takes a query/key head as ``dim * dim / n_heads`` entries, which is
      a head only where ``head_dim = dim / n_heads``; it is ``head_dim * dim`` (the same number there).
    - Vectors named like a neuron- or head-wise block (BERT's ``embeddings.LayerNorm``, T5's
      ``final_layer_norm``: "embed", "final_layer") would be indexed as matrices and fail; they get
      the rule the package gives norms, one second moment for the whole vector, by a group name that
      matches no rule.
    """
    shape = geometry(model, config)
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    optimizer = Adam_mini(
        named,
        lr=float(args.learning_rate),
        betas=(float(args.adam_beta1), float(args.adam_beta2)),
        eps=float(args.adam_epsilon),
        weight_decay=float(args.weight_decay),
        dim=shape["dim"],
        n_heads=shape["n_heads"],
        n_kv_heads=shape["n_kv_heads"],
        verbose=False,
    )
    optimizer.world_size = 1
    optimizer.head_numel = shape["head_dim"] * shape["dim"]
    for index, group in enumerate(optimizer.param_groups):
        if group["params"][0].dim() < 2 and _block_kind(optimizer, group["name"]) in ("head", "neuron"):
            group["name"] = f"vector {index}"  # the package selects a rule by this name; this one matches none
    return optimizer


def _block_kind(optimizer: Adam_mini, name: str) -> str:
    """Which of the package's update rules a parameter's name selects, in the package's order."""
    if any(key in name for key in optimizer.adam_block_names):
        return "adam"
    if any(key in name for key in optimizer.wqk_names):
        return "head"
    neuron_names = (
        optimizer.embd_names | optimizer.output_names | optimizer.wv_names | optimizer.mlp_names
    ) | optimizer.attn_proj_names
    if any(key in name for key in neuron_names):
        return "neuron"
    return "block"


def state_bytes(optimizer: Adam_mini) -> int:
    """Bytes of the state the package keeps once every parameter has stepped (works on meta tensors).

    Every parameter keeps its first moment ``m`` (its own size and dtype); the second moment is a
    full tensor for biases (plain Adam), one value per query/key head, one per output row for the
    neuron-wise blocks (embeddings, values, MLPs, output projections) and one per whole block else.
    """
    total = 0
    for group in optimizer.param_groups:
        kind = _block_kind(optimizer, group["name"])
        for param in group["params"]:
            numel, size = param.numel(), param.element_size()
            second = {
                "adam": numel,
                "head": max(numel // optimizer.head_numel, 1),
                "neuron": param.shape[0] if param.dim() > 1 else 1,
                "block": 1,
            }[kind]
            total += (numel + second) * size
    return total


def adamw_state_bytes(model: nn.Module) -> int:
    """AdamW's two moments of every trainable parameter, for comparison."""
    return sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
