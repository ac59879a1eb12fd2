"""Every method through TRL's SFTTrainer, DPOTrainer and RewardTrainer, the same two lines each time.

SFTTrainer takes ``**adapted.trainer_kwargs()`` like the plain Trainer; DPOTrainer and
RewardTrainer have no ``optimizer_cls_and_kwargs``, so they take ``**adapted.trainer_kwargs(args)``
(the optimizer built from their own config, passed as ``optimizers=``). Each run must train (loss
falls) and export; DPO's first loss must be ln 2, which holds only when its reference is the
method's initial model (TRL keeps a frozen copy of the adapter: right for residual methods too).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from method_settings import SMALL_SETTINGS
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import hf_lowrank_plugins as hlp
from hf_lowrank_plugins.outputs import verify_manifest

pytestmark = pytest.mark.integration  # end to end: left out of `make test-fast`


trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _config(cls, tmp_path, **kw):
    settings = dict(
        output_dir=str(tmp_path / "ckpt"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        report_to=[],
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        gradient_checkpointing=False,
    )
    return cls(**{**settings, **kw})


def _losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def _check_export(adapted, tmp_path):
    result = adapted.export(tmp_path / "export", merge=True)
    assert verify_manifest(tmp_path / "export") == [] and result.merged_dir is not None
    if adapted.method.trains_adapter:
        assert not (result.adapter_dir / "ref").exists()  # TRL's reference copy is not part of the deliverable


@pytest.mark.parametrize("method", sorted(SMALL_SETTINGS))
def test_sft_trainer(method, tmp_path, tiny_model_dir):
    """Every shipped method under TRL's SFTTrainer (and below, its DPO and reward trainers)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    adapted = hlp.attach(AutoModelForCausalLM.from_pretrained(tiny_model_dir), method, **SMALL_SETTINGS[method])
    data = datasets.Dataset.from_list([{"prompt": "Say yes:", "completion": " yes, yes"}] * 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(
            model=adapted.model,
            args=_config(trl.SFTConfig, tmp_path),
            train_dataset=data,
            processing_class=tokenizer,
            **adapted.trainer_kwargs(),
        )
        trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0], losses
    _check_export(adapted, tmp_path)


@pytest.mark.parametrize("method", sorted(SMALL_SETTINGS))
def test_dpo_trainer(method, tmp_path, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    adapted = hlp.attach(AutoModelForCausalLM.from_pretrained(tiny_model_dir), method, **SMALL_SETTINGS[method])
    data = datasets.Dataset.from_list([{"prompt": "Say yes:", "chosen": " yes", "rejected": " no"}] * 16)
    args = _config(trl.DPOConfig, tmp_path)
    ids = tokenizer("Say yes: yes", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        started = adapted.model.eval()(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(
            model=adapted.model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            **adapted.trainer_kwargs(args),
        )
        # TRL's "ref" adapter must leave the policy as the method started it (a second PiSSA SVD rewrote the base);
        # on a 4-bit base TRL casts the trained adapter to bf16 (the QLoRA recipe), which moves LoftQ's nonzero
        # start by bf16 rounding, so there the frozen copy is compared with it, in its dtype
        if hlp.is_quantized(adapted.model):
            weights = dict(adapted.model.named_parameters())
            pairs = [(p, weights[name.replace(".ref.", ".default.")]) for name, p in weights.items() if ".ref." in name]
            assert pairs and all(torch.equal(ref.to(policy.dtype), policy) for ref, policy in pairs)
        else:
            with torch.no_grad():
                assert (adapted.model.eval()(ids).logits - started).abs().max() <= 1e-5
        if method == "lora_ga":  # its initialisation needs the model's own loss, which DPO batches do not give
            with pytest.raises(hlp.LowRankError, match="initialise LoRA-GA in an SFT run"):
                trainer.train()
            return
        trainer.train()
    losses = _losses(trainer)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # the reference is the initial policy
    assert losses[-1] < losses[0], losses
    _check_export(adapted, tmp_path)
    if method in ("lora", "dora", "pissa"):  # adapters on the original base (SALOR's go on its pruned base/)
        reloaded = hlp.load_adapter(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "export" / "adapter"
        )
        with torch.no_grad():
            trained, again = adapted.model.eval()(ids).logits, reloaded.model.eval()(ids).logits
        assert (again - trained).abs().max() <= 1e-5


@pytest.mark.parametrize("method", sorted(SMALL_SETTINGS))
def test_reward_trainer(method, tmp_path, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    if method == "corda":  # a classifier's covariances would be estimated wrongly: refused, as on RoBERTa
        with pytest.raises(hlp.IncompatibleError, match="CorDA on a SEQ_CLS model is not supported"):
            hlp.attach(model, method, **SMALL_SETTINGS[method])
        return
    adapted = hlp.attach(model, method, **SMALL_SETTINGS[method])
    data = datasets.Dataset.from_list([{"chosen": "The answer is yes, clearly.", "rejected": "No."}] * 16)
    # TRL casts a quantized model's trainable parameters (the score head too) to bf16, as the QLoRA recipe does;
    # the fp32 norm before the head then needs bf16 autocast, TRL's own default (bf16=True)
    four_bit = adapted.method.requires_quantized_base
    args = _config(trl.RewardConfig, tmp_path, **({"bf16": True} if four_bit else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.RewardTrainer(
            model=adapted.model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            **adapted.trainer_kwargs(args),
        )
        if method == "lora_ga":
            with pytest.raises(hlp.LowRankError, match="initialise LoRA-GA in an SFT run"):
                trainer.train()
            return
        trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0], losses
    _check_export(adapted, tmp_path)
