"""Run by test_lora_ga.py under torchrun: LoRA-GA through a plain Trainer on 2 CPU processes (gloo).

Prints, on rank 0, the largest difference across ranks of the initial factors A0, B0 and of the
residual base weights right after the data-dependent init (dequantized on a 4-bit base: argument
``4bit``), and of the trained adapter.
"""

import json
import sys

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

import hf_lowrank_plugins as hlp
from hf_lowrank_lora.residual import initial_factors
from hf_lowrank_plugins.quantization import dequantized_4bit_weight, is_4bit_layer
from hf_lowrank_plugins.testing.helpers import TokenDataset, make_tiny_model, training_args

out = sys.argv[1]
four_bit = sys.argv[3:] == ["4bit"]
adapted = hlp.attach(make_tiny_model(), "lora_ga", r=4, ga_batches=2, estimator=sys.argv[2], load_in_4bit=four_bit)
snapshot = {}


def base_weights():
    return [
        (dequantized_4bit_weight(m) if is_4bit_layer(m) else m.weight.detach()).flatten()
        for n, m in sorted(adapted.model.named_modules())
        if n.endswith("base_layer")
    ]


class AfterInit(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        factors = initial_factors(adapted.model)
        snapshot["init"] = torch.cat([t.flatten() for k in sorted(factors) for t in factors[k]] + base_weights())


args = training_args(out, max_steps=4, per_device_train_batch_size=4, ddp_backend="gloo", learning_rate=1e-3)
trainer = Trainer(
    model=adapted.model,
    args=args,
    train_dataset=TokenDataset(),
    callbacks=[adapted.callback, AfterInit()],
    optimizer_cls_and_kwargs=(adapted.optimizer_factory, {}),
)
trainer.train()


def spread(t):
    gathered = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


trained = torch.cat([p.detach().flatten() for n, p in sorted(adapted.model.named_parameters()) if p.requires_grad])
result = {
    "world_size": dist.get_world_size(),
    "init_difference": spread(snapshot["init"]),
    "trained_difference": spread(trained),
    "init_norm": float(snapshot["init"].abs().sum()),
}
if dist.get_rank() == 0:
    print(json.dumps(result))
# Leave together: a rank that exits while the other is still in gloo can abort in teardown
# ("terminate called without an active exception").
dist.barrier()
dist.destroy_process_group()
