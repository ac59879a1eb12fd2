"""Train methods under DeepSpeed ZeRO (run by test_deepspeed.py under torchrun), or alone as the reference.

``python -m torch.distributed.run --nproc_per_node 2 deepspeed_train.py STAGE OUT METHOD...`` trains each
method in turn on 2 CPU processes (gloo) under ZeRO-``STAGE``; :func:`train` without a stage is the
single-process run with the same global batch. With ``RESUME_METHODS=a,b`` those methods are also
trained again from their halfway checkpoint into ``OUT/METHOD/resumed``. Per method, rank 0 writes ``OUT/METHOD/result.json``
(losses, or the refusal) and ``weights.pt`` (the trained parameters, gathered under ZeRO-3); every
rank calls ``export`` (ZeRO-3 gathers for it).
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch
from transformers import Trainer
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.distributed import gathered
from hf_lowrank_plugins.testing.helpers import TokenDataset, make_tiny_model, training_args

GLOBAL_BATCH, STEPS = 8, 4


def deepspeed_config(stage: int) -> dict:
    """A ZeRO config whose batch settings the Trainer fills in ("auto")."""
    return {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
    }


def train(method: str, out: Path, stage: int | None = None, resume_from: Path | None = None) -> None:
    """Train ``method`` for a few steps (under ZeRO-``stage`` when given) and write its results into ``out``.

    A checkpoint is saved halfway; ``resume_from`` continues from such a checkpoint instead of step 0.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    main = int(os.environ.get("RANK", "0")) == 0
    out.mkdir(parents=True, exist_ok=True)
    # The model is built before TrainingArguments exist: with a ZeRO-3 config alive, from_config would
    # build it already partitioned (deepspeed.zero.Init), which PEFT's layer replacement cannot wrap.
    fields = {} if method == "full" else {"rank": 4}
    adapted = hlp.attach(make_tiny_model(), method, load_in_4bit=method == "qlora", **fields)
    extra = {} if stage is None else {"deepspeed": deepspeed_config(stage), "ddp_backend": "gloo"}
    args = training_args(
        out / "trainer",
        max_steps=STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        save_strategy="steps",
        save_steps=STEPS // 2,
        **extra,
    )
    try:
        trainer = Trainer(model=adapted.model, args=args, train_dataset=TokenDataset(), **adapted.trainer_kwargs())
    except hlp.IncompatibleError as refused:
        if main:
            (out / "result.json").write_text(json.dumps({"refused": str(refused)}))
        return
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    params = [p for _, p in sorted(adapted.model.named_parameters()) if p.requires_grad]
    with gathered(params):
        weights = torch.cat([p.detach().flatten().float().clone() for p in params])
    adapted.export(out / "export")
    if main:
        torch.save(weights, out / "weights.pt")
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        (out / "result.json").write_text(json.dumps({"losses": losses, "stage": stage, "world_size": world}))
    del trainer, args, adapted
    unset_hf_deepspeed_config()  # so the next method's model is built whole, not under deepspeed.zero.Init
    gc.collect()


if __name__ == "__main__":
    zero_stage, root = int(sys.argv[1]), Path(sys.argv[2])
    for name in sys.argv[3:]:
        train(name, root / name, zero_stage)
        if name in os.environ.get("RESUME_METHODS", "").split(","):  # and again from its halfway checkpoint
            train(
                name,
                root / name / "resumed",
                zero_stage,
                resume_from=root / name / "trainer" / f"checkpoint-{STEPS // 2}",
            )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
