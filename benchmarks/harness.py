"""Shared benchmark worker: build one variant, train it a few steps in a fresh process, measure it.

Used by ``bench_anchors.py`` (our plugins against their anchors), ``cost_growth.py`` (one method
at growing width and rank) and ``plugins/galore/benchmarks/bench_galore.py``. A variant is
``ours:<name>`` (``attach`` + Trainer), ``peft:<name>`` (plain PEFT + Trainer),
``hf:<optim>`` (transformers' own GaLore optimizers), ``official:<name>`` (a method's official
package, as its README sets it up) or ``full`` (plain Trainer, its default AdamW,
no plugin at all). Each runs in its own process (:func:`run_isolated`) so its peak memory is its
own; the worker prints one ``BENCH_RESULT {json}`` line.

Measured per variant: median and min step seconds after warm-up (forward, backward and update;
evaluation excluded), init seconds (attach / get_peft_model / preprocess_loraga, plus any
data-dependent initialisation before the first step), peak RSS of the whole process and of
training alone (the high-water mark is reset before ``train()`` via ``/proc/self/clear_refs``
where the kernel allows), optimizer state bytes, trainable parameters, eval loss after training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "
#: transformers' GaLore targets: every linear layer except the (tied) output head, as ours selects.
HF_GALORE_TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclasses.dataclass
class BenchOptions:
    """What every variant of one invocation shares (the same model, batch and budget)."""

    steps: int = 6  # measured steps, after the warm-up steps
    warmup: int = 2
    batch_size: int = 2
    seq_len: int = 64
    rank: int = 16  # adapter rank (r = alpha for the LoRA family)
    galore_rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    lr: float = 1e-4
    lr_scheduler: str = "linear"
    eval_blocks: int = 4
    ga_batches: int = 2  # LoRA-GA gradient batches, ours and PEFT's alike
    threads: int | None = None
    model: str | None = None  # checkpoint directory; None = the embedded SmolLM2-135M
    width: int | None = None  # instead: a SmolLM2-shaped model of this hidden size, random init from config
    layers: int = 4  # layers of the config-built model


@dataclasses.dataclass(frozen=True)
class Variant:
    """A benchmark variant: what it is, what it is compared against, which of our methods it needs."""

    description: str
    anchor: str | None = None
    needs_method: str | None = None


VARIANTS: dict[str, Variant] = {
    "ours:lora": Variant("hf-lowrank lora", "peft:lora", "lora"),
    "peft:lora": Variant("PEFT LoraConfig"),
    "ours:lora_variant_only": Variant(
        "hf-lowrank lora through PEFT's layer call (the fused add only, no one-node layer)", "ours:lora", "lora"
    ),
    "ours:dora": Variant("hf-lowrank dora", "peft:dora", "dora"),
    "ours:dora_variant_only": Variant(
        "hf-lowrank dora through PEFT's layer call (its variant only, no one-node layer)", "ours:dora", "dora"
    ),
    "peft:dora": Variant("PEFT LoraConfig(use_dora=True)"),
    "ours:pissa": Variant("hf-lowrank pissa, exact SVD", "peft:pissa", "pissa"),
    "peft:pissa": Variant("PEFT init_lora_weights='pissa'"),
    "ours:pissa_fast": Variant("hf-lowrank pissa, svd=fast (16 iterations)", "peft:pissa_fast", "pissa"),
    "peft:pissa_fast": Variant("PEFT init_lora_weights='pissa_niter_16'"),
    "ours:lora_ga": Variant("hf-lowrank lora_ga", "peft:lora_ga", "lora_ga"),
    "peft:lora_ga": Variant("PEFT preprocess_loraga + init_lora_weights='lora_ga'"),
    "ours:lora_ga_one_pass": Variant(
        "hf-lowrank lora_ga, ga_layer_groups=1 (one pass over the batches)", "peft:lora_ga", "lora_ga"
    ),
    "ours:qlora": Variant("hf-lowrank qlora (loaded in 4-bit)", "peft:qlora", "qlora"),
    "peft:qlora": Variant("PEFT prepare_model_for_kbit_training + LoRA (loaded in 4-bit)"),
    "ours:galore": Variant("hf-lowrank galore (adamw)", "hf:galore_adamw", "galore"),
    "hf:galore_adamw": Variant("transformers optim=galore_adamw"),
    "ours:galore_layerwise": Variant("hf-lowrank galore, layerwise=True", "hf:galore_adamw_layerwise", "galore"),
    "hf:galore_adamw_layerwise": Variant("transformers optim=galore_adamw_layerwise"),
    "ours:galore_8bit": Variant("hf-lowrank galore, optimizer=adamw8bit", None, "galore"),
    "ours:galore_adafactor": Variant(
        "hf-lowrank galore, optimizer=adafactor (optim=adafactor)", "hf:galore_adafactor", "galore"
    ),
    "hf:galore_adafactor": Variant("transformers optim=galore_adafactor"),
    "ours:olora": Variant("hf-lowrank olora", "peft:olora", "olora"),
    "peft:olora": Variant("PEFT init_lora_weights='olora'"),
    "ours:eva": Variant("hf-lowrank eva (rho=2, at train start on the Trainer's batches)", "peft:eva", "eva"),
    "peft:eva": Variant("PEFT init_lora_weights='eva' + initialize_lora_eva_weights before training"),
    "ours:corda": Variant("hf-lowrank corda (ipm, 8 batches at train start)", "peft:corda", "corda"),
    "peft:corda": Variant("PEFT preprocess_corda (the same sequences, one at a time) + init_lora_weights='corda'"),
    "ours:adam_mini": Variant("hf-lowrank adam_mini", "official:adam_mini", "adam_mini"),
    "official:adam_mini": Variant("the adam-mini package's Adam_mini passed to the Trainer (its README's setup)"),
    "ours:apollo": Variant("hf-lowrank apollo (rank --galore-rank, channel-wise)", "hf:apollo_adamw", "apollo"),
    "hf:apollo_adamw": Variant("transformers optim=apollo_adamw (the apollo-torch package)"),
    "ours:apollo_layerwise": Variant(
        "hf-lowrank apollo, layerwise=True (each projected weight updated from its gradient hook)",
        "hf:apollo_adamw_layerwise",
        "apollo",
    ),
    "hf:apollo_adamw_layerwise": Variant("transformers optim=apollo_adamw_layerwise (one optimizer per weight)"),
    "ours:apollo_mini": Variant("hf-lowrank apollo_mini (rank 1, tensor-wise, scale 128)", "hf:apollo_mini", "apollo"),
    "hf:apollo_mini": Variant("transformers optim=apollo_adamw with APOLLO-Mini's optim_args"),
    "ours:full": Variant("hf-lowrank full (built-in method)", "full", "full"),
    "ours:salor": Variant("hf-lowrank salor (50% pruned base, fast SVD repair)", None, "salor"),
    "limit:frozen": Variant("the floor of any adapter method: frozen base, backward through the activations only"),
    "limit:bare_lora": Variant("LoRA's maths alone: base + B(A x) in plain torch modules, no PEFT layer around it"),
    "full": Variant("plain Trainer, full fine-tuning with its default AdamW"),
}


# ---------------------------------------------------------------- memory


def rss_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM); 0 where there is no /proc."""
    from hf_lowrank_plugins.memory import status_bytes

    return status_bytes(field) // 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM so the next peak measures what follows only; False where the kernel refuses."""
    from hf_lowrank_plugins.memory import reset_peak_resident

    return reset_peak_resident()


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of all tensors reachable from the optimizer state, each storage counted once.

    A sliced SVD factor counts the whole factor it keeps alive; galore-torch's projector objects
    are followed; transformers' layer-wise optimizers keep one optimizer per parameter.
    """
    import torch

    while hasattr(optimizer, "optimizer"):  # accelerate's wrapper
        optimizer = optimizer.optimizer
    optimizers = list(getattr(optimizer, "optimizer_dict", {}).values()) or [optimizer]
    seen: set[int] = set()
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif hasattr(value, "ortho_matrix"):  # galore-torch's GaLoreProjector
            visit(value.ortho_matrix)

    for opt in optimizers:
        for state in opt.state.values():
            visit(state)
    return total


# ---------------------------------------------------------------- model, data, variants


def smollm2_shaped_config(width: int, layers: int, vocab_size: int) -> Any:
    """A SmolLM2-shaped Llama config (head dim 64, about 3 query heads per KV head, MLP 8/3 x width).

    The KV head count is the largest divisor of the head count up to a third of it (attention needs
    the query heads to split evenly over the KV heads): 3 for SmolLM2's 9, 4 for width 1024's 16.
    """
    from transformers import LlamaConfig

    heads = max(1, width // 64)
    kv_heads = max(d for d in range(1, max(1, heads // 3) + 1) if heads % d == 0)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=64 * round(width * 8 / 3 / 64),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )


def config_model(width: int, layers: int, vocab_size: int) -> Any:
    """A :func:`smollm2_shaped_config` model, random init in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(smollm2_shaped_config(width, layers, vocab_size), dtype=torch.float32)


def _ours(name: str, o: BenchOptions) -> tuple[str, dict[str, Any]]:
    """Our method and its fields for an ``ours:`` variant (same rank/alpha as its anchor)."""
    lora = {"r": o.rank, "lora_alpha": o.rank}
    galore = {"rank": o.galore_rank, "update_proj_gap": o.update_proj_gap, "scale": o.scale}
    return {
        "lora": ("lora", lora),
        "dora": ("dora", lora),
        "qlora": ("qlora", lora),
        "pissa": ("pissa", {"r": o.rank, "svd": "exact"}),
        "pissa_fast": ("pissa", {"r": o.rank, "svd": "fast", "svd_niter": 16}),
        "lora_ga": ("lora_ga", {**lora, "ga_batches": o.ga_batches}),
        "lora_ga_one_pass": ("lora_ga", {**lora, "ga_batches": o.ga_batches, "ga_layer_groups": 1}),
        "galore": ("galore", galore),
        "galore_layerwise": ("galore", {**galore, "layerwise": True}),
        "galore_8bit": ("galore", {**galore, "optimizer": "adamw8bit"}),
        "galore_adafactor": ("galore", {**galore, "optimizer": "adafactor"}),
        "salor": ("salor", {**lora, "svd": "fast"}),
        "olora": ("olora", lora),
        "eva": ("eva", lora),
        "corda": ("corda", {**lora, "calibration_batches": o.ga_batches}),
        "adam_mini": ("adam_mini", {}),
        "apollo": ("apollo", {"rank": o.galore_rank, "update_proj_gap": o.update_proj_gap}),
        "apollo_mini": ("apollo_mini", {"update_proj_gap": o.update_proj_gap}),
        "apollo_layerwise": (
            "apollo",
            {"rank": o.galore_rank, "update_proj_gap": o.update_proj_gap, "layerwise": True},
        ),
        "full": ("full", {}),
    }[name.removesuffix("_variant_only")]  # the ablations attach the method itself (see build_variant)


def _peft_model(name: str, model: Any, train: Any, o: BenchOptions) -> Any:
    """The plain-PEFT anchor: the LoraConfig PEFT documents for each method."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    kw: dict[str, Any] = {"r": o.rank, "lora_alpha": o.rank, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
    if name == "dora":
        kw["use_dora"] = True
    elif name == "pissa":
        kw["init_lora_weights"] = "pissa"
    elif name == "pissa_fast":
        kw["init_lora_weights"] = "pissa_niter_16"
    elif name == "olora":
        kw["init_lora_weights"] = "olora"
    elif name == "eva":
        from peft import EvaConfig
        from peft.tuners.lora.eva import initialize_lora_eva_weights

        model = get_peft_model(model, LoraConfig(**kw, init_lora_weights="eva", eva_config=EvaConfig()))
        loader = torch.utils.data.DataLoader(train, batch_size=o.batch_size)
        initialize_lora_eva_weights(model, dataloader=loader, show_progress_bar=False)
        return model
    elif name == "corda":
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        # as ours: the first --ga-batches batches, each sequence alone (PEFT's hook reads one sequence per call);
        # preprocess_corda runs before get_peft_model, which is what expands "all-linear": name the layers
        kw["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        config = LoraConfig(**kw, init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"))
        loader = torch.utils.data.DataLoader(train, batch_size=o.batch_size)

        def run_model() -> None:
            for i, batch in enumerate(loader):
                if i == o.ga_batches:
                    break
                for row in batch["input_ids"]:
                    model(input_ids=row[None])

        preprocess_corda(model, config, run_model=run_model)
        return get_peft_model(model, config)
    elif name == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif name == "lora_ga":
        from peft import LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        # preprocess_loraga runs before get_peft_model, which is what expands "all-linear": name the layers
        kw["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        config = LoraConfig(**kw, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
        loader = torch.utils.data.DataLoader(train, batch_size=o.batch_size)

        def train_step() -> None:
            for i, batch in enumerate(loader):
                if i == o.ga_batches:
                    break
                model(**batch).loss.backward()

        preprocess_loraga(model, config, train_step)
        return get_peft_model(model, config)
    return get_peft_model(model, LoraConfig(**kw))


def _frozen_limit(model: Any) -> Any:
    """``model`` with every weight frozen and the backward forced through all activations.

    One scalar (1.0) multiplies the input embeddings, so the loss's gradient flows through every
    layer's activations back to the embedding output, as for any adapter, but no weight gets a
    gradient: the compute and activation memory no adapter method can go below.
    """
    import torch

    for param in model.parameters():
        param.requires_grad_(False)
    model.register_parameter("hf_lowrank_limit_scale", torch.nn.Parameter(torch.ones(())))
    model.get_input_embeddings().register_forward_hook(lambda mod, args, out: out * model.hf_lowrank_limit_scale)
    return model


def _bare_lora(model: Any, rank: int) -> Any:
    """``model`` frozen, every linear layer but the output head computing ``W x + B (A x)`` in plain
    torch modules (PEFT's initialisation: Kaiming-uniform A, zero B; ``s = alpha / r = 1`` as in
    every LoRA variant here, so no multiply).

    Between ``limit:frozen`` and ``ours:lora``/``peft:lora`` it separates what LoRA's maths costs
    (its six rank-r matrix products per layer and the sum) from what a full adapter layer (PEFT's
    wrapper: adapters by name, dropout, dtype casts, merging) adds.
    """
    import math

    import torch
    import torch.nn.functional as F
    from torch import nn

    class BareLoraLinear(nn.Module):
        def __init__(self, base: nn.Linear) -> None:
            super().__init__()
            self.base = base
            self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
            self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B)

    for param in model.parameters():
        param.requires_grad_(False)
    head = model.get_output_embeddings()
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    for name in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, BareLoraLinear(model.get_submodule(name)))
    return model


def load_model(variant: str, o: BenchOptions, tokenizer: Any) -> Any:
    """The base model every variant starts from (fp32; loaded straight in 4-bit for the QLoRA pair)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_lowrank_plugins.app.embedded import default_model_dir

    source = o.model or default_model_dir()
    if o.width is not None:
        # Every variant loads the config-built model from a checkpoint, as a real run does (on a CPU
        # transformers memory-maps it), built and saved once by another process so that building it
        # leaves nothing in this one.
        source = str(Path(tempfile.gettempdir()) / f"hf-lowrank-bench-w{o.width}-l{o.layers}-v{len(tokenizer)}")
        if not (Path(source) / "config.json").is_file():
            code = (
                "import sys; sys.path.insert(0, sys.argv[1]); from harness import config_model; "
                "config_model(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])).save_pretrained(sys.argv[5])"
            )
            args = [str(Path(__file__).parent), str(o.width), str(o.layers), str(len(tokenizer)), source]
            subprocess.run([sys.executable, "-c", code, *args], check=True)
    load_kw: dict[str, Any] = {"dtype": torch.float32}
    if variant.endswith(":qlora"):  # both sides load straight in 4-bit: the path for models that do not fit in fp32
        from hf_lowrank_plugins import QuantizationSettings
        from hf_lowrank_plugins.quantization import bnb_config

        load_kw["quantization_config"] = bnb_config(QuantizationSettings(compute_dtype=torch.float32))
    return AutoModelForCausalLM.from_pretrained(source, **load_kw)


def build_variant(variant: str, model: Any, train: Any, o: BenchOptions) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Turn the loaded ``model`` into ``variant``: the model to train, the Trainer's keyword arguments
    (callbacks, optimizer factory) and extra ``TrainingArguments`` fields (``optim`` and its settings)."""
    from hf_lowrank_plugins import attach

    kind, _, name = variant.partition(":")
    trainer_kw: dict[str, Any] = {}
    extra_args: dict[str, Any] = {}
    if kind == "ours":
        method, fields = _ours(name, o)
        adapted = attach(model, method, **fields)
        model, trainer_kw = adapted.model, adapted.trainer_kwargs()
        if name == "galore_adafactor":
            extra_args = {"optim": "adafactor"}  # the Trainer's Adafactor settings, as transformers' galore_adafactor
        elif name.endswith("_variant_only"):  # through PEFT's layer call, without the one-node layer
            from hf_lowrank_lora import use_peft_layer_call

            use_peft_layer_call(model)
    elif kind == "peft":
        model = _peft_model(name, model, train, o)
    elif kind == "official":  # adam_mini: the package's optimizer, built as its README shows
        from adam_mini import Adam_mini

        config = model.config
        optimizer = Adam_mini(
            model.named_parameters(),
            lr=o.lr,
            weight_decay=0.0,  # TrainingArguments' default, which ours takes over
            dim=config.hidden_size,
            n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads,
            verbose=False,
        )
        trainer_kw = {"optimizers": (optimizer, None)}
    elif kind == "limit":
        model = _frozen_limit(model) if name == "frozen" else _bare_lora(model, o.rank)
    elif kind == "hf" and name.startswith("apollo"):
        mini = name == "apollo_mini"
        rank, scaling = (1, "scale_type=tensor,scale=128") if mini else (o.galore_rank, "scale_type=channel,scale=1")
        extra_args = {
            "optim": "apollo_adamw_layerwise" if name.endswith("layerwise") else "apollo_adamw",
            "optim_target_modules": HF_GALORE_TARGETS,
            "optim_args": f"rank={rank},proj=random,{scaling},update_proj_gap={o.update_proj_gap}",
        }
    elif kind == "hf":
        extra_args = {
            "optim": name,
            "optim_target_modules": HF_GALORE_TARGETS,
            "optim_args": f"rank={o.galore_rank},update_proj_gap={o.update_proj_gap},scale={o.scale}",
        }
    return model, trainer_kw, extra_args


def run_variant(variant: str, o: BenchOptions) -> dict[str, Any]:
    """Build ``variant``, train ``warmup + steps`` steps in this process and return its measurements."""
    import torch
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from hf_lowrank_plugins.app.data import load_blocks
    from hf_lowrank_plugins.app.embedded import default_model_dir
    from hf_lowrank_plugins.app.train import StepTimer, count_trainable

    if o.threads:
        torch.set_num_threads(o.threads)
    tokenizer = AutoTokenizer.from_pretrained(o.model if o.model and o.width is None else default_model_dir())
    total = o.steps + o.warmup
    train, held_out = load_blocks(
        None, tokenizer, o.seq_len, max_blocks=total * o.batch_size + o.eval_blocks, eval_blocks=o.eval_blocks
    )
    started = time.perf_counter()
    model = load_model(variant, o, tokenizer)
    loaded = time.perf_counter()
    model, trainer_kw, extra_args = build_variant(variant, model, train, o)
    attach_s = time.perf_counter() - loaded
    rss_setup = rss_kib("VmHWM")

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=total,
            per_device_train_batch_size=o.batch_size,
            per_device_eval_batch_size=o.batch_size,
            learning_rate=o.lr,
            lr_scheduler_type=o.lr_scheduler,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=0,
            **extra_args,
        )
        callbacks = [timer, *trainer_kw.pop("callbacks", [])]  # timer first: its startup covers data-dependent init
        trainer = Trainer(
            model=model, args=args, train_dataset=train, eval_dataset=held_out, callbacks=callbacks, **trainer_kw
        )
        rss_before = rss_kib("VmRSS")
        reset = reset_peak_rss()
        trainer.train()
        peak_train = rss_kib("VmHWM")
        state_bytes = optimizer_state_bytes(trainer.optimizer)
        eval_loss = trainer.evaluate()["eval_loss"]
    measured = timer.step_seconds[o.warmup :] or timer.step_seconds
    result = {
        "variant": variant,
        "description": VARIANTS[variant].description,
        "median_step_s": statistics.median(measured),
        "min_step_s": min(measured),
        "step_s": timer.step_seconds,
        "init_s": attach_s + timer.startup_seconds,
        "load_s": loaded - started,
        "peak_rss_mib": max(rss_setup, peak_train) / 1024,
        "peak_train_rss_mib": peak_train / 1024,
        "rss_before_train_mib": rss_before / 1024,
        "peak_is_train_only": reset,
        "opt_state_mib": state_bytes / 2**20,
        "trainable_params": count_trainable(model),
        "model_params": sum(p.numel() for p in model.parameters()),
        "eval_loss": eval_loss,
        "final_loss": [e["loss"] for e in trainer.state.log_history if "loss" in e][-1],
    }
    if torch.cuda.is_available():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


# ---------------------------------------------------------------- parent side


def installed_methods() -> set[str]:
    """Our installed methods (so variants whose plugin is missing are skipped, not failed)."""
    from hf_lowrank_plugins import get_registry

    return set(get_registry().methods)


def run_isolated(variant: str, options: BenchOptions, timeout: float | None = None) -> dict[str, Any]:
    """Run one variant in a fresh Python process; ``{"variant", "error"}`` when it fails."""
    cmd = [sys.executable, __file__, variant, json.dumps(dataclasses.asdict(options))]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timed out after {timeout:.0f}s"}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)), None)
    if proc.returncode != 0 or line is None:
        tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()][-1:]
        return {"variant": variant, "error": " | ".join(tail) or f"exit status {proc.returncode}"}
    return {**json.loads(line[len(RESULT_PREFIX) :]), "wall_s": time.perf_counter() - started}


def figure(value: float) -> str:
    """A figure for a table: thousands as whole numbers (1,480), smaller ones to 3 significant digits."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def machine() -> dict[str, Any]:
    """The machine the figures came from: CPU model and count, load, versions, GPU if any."""
    import torch

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info["cpu_model"] = next(
            (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), None
        )
    except (OSError, subprocess.SubprocessError):
        info["cpu_model"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(path: str | Path, document: dict[str, Any]) -> Path:
    """Write ``document`` (settings, machine, command, results) through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def add_options(parser: argparse.ArgumentParser, defaults: BenchOptions | None = None) -> None:
    """Command-line flags for every :class:`BenchOptions` field (``--batch-size`` for ``batch_size``)."""
    defaults = defaults or BenchOptions()
    for field in dataclasses.fields(BenchOptions):
        default = getattr(defaults, field.name)
        kind = {"int": int, "float": float}.get(str(field.type).split(" ")[0], str)
        parser.add_argument("--" + field.name.replace("_", "-"), type=kind, default=default, help=f"default: {default}")


def options_from(ns: argparse.Namespace) -> BenchOptions:
    """The :class:`BenchOptions` parsed by :func:`add_options`."""
    return BenchOptions(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(BenchOptions)})


if __name__ == "__main__":  # worker: harness.py VARIANT OPTIONS_JSON
    print(RESULT_PREFIX + json.dumps(run_variant(sys.argv[1], BenchOptions(**json.loads(sys.argv[2])))), flush=True)
