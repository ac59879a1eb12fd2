"""Run by test_ddp.py under torchrun: one method through a plain Trainer on 2 CPU processes (gloo)."""

import json
import sys

import torch
import torch.distributed as dist
from transformers import Trainer

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.testing.helpers import TokenDataset, make_tiny_model, training_args

method, out = sys.argv[1], sys.argv[2]
adapted = hlp.attach(make_tiny_model(), method, rank=4)
args = training_args(out, max_steps=6, per_device_train_batch_size=4, ddp_backend="gloo")
trainer = Trainer(model=adapted.model, args=args, train_dataset=TokenDataset(), **adapted.trainer_kwargs())
trainer.train()
flat = torch.cat([p.detach().flatten() for n, p in sorted(adapted.model.named_parameters()) if p.requires_grad])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
adapted.export(f"{out}/export")
if dist.get_rank() == 0:
    print(
        json.dumps(
            {
                "world_size": dist.get_world_size(),
                "max_rank_difference": max(float((g - gathered[0]).abs().max()) for g in gathered),
                "moved": float((flat).abs().sum()),
                "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            }
        )
    )
# Leave together: a rank that exits while the other is still in gloo can abort in teardown
# ("terminate called without an active exception").
dist.barrier()
dist.destroy_process_group()
