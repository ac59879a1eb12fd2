"""Adam-mini's settings, as a ``peft.PeftConfig`` subclass so the core treats it like any method config."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig

from hf_lowrank_plugins import MethodConfig, validate_config


@dataclass
class AdamMiniConfig(PeftConfig, MethodConfig):
    """Adam-mini: every weight trains; the optimizer keeps Adam's first moment per entry but one second
    moment per block (a query/key head, an output neuron, a whole norm), about half of AdamW's state.

    The learning rate, betas, epsilon and weight decay are the Trainer's (``--lr``,
    ``adam_beta1``/``adam_beta2``, ``adam_epsilon``, ``weight_decay``). The attention geometry that
    sizes a query/key head is read from the model's config; set it here only for a model whose
    config does not name it the transformers way.
    """

    hidden_size: int | None = field(
        default=None, metadata={"help": "model width (default: the model config's hidden_size)", "min": 1}
    )
    num_attention_heads: int | None = field(
        default=None, metadata={"help": "query heads (default: the model config's)", "min": 1}
    )
    num_key_value_heads: int | None = field(
        default=None, metadata={"help": "key/value heads (default: the model config's, else the query heads)", "min": 1}
    )
    head_dim: int | None = field(
        default=None,
        metadata={"help": "width of a head (default: the model config's, else hidden_size / heads)", "min": 1},
    )

    def __post_init__(self) -> None:
        validate_config(self)
        super().__post_init__()
