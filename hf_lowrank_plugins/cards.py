"""Model cards (``README.md``) for every deliverable: what it is, how it was trained, how to load and serve it.

Written from the files themselves where they say it (the adapter's ``adapter_config.json``: rank,
targets, DoRA, ``modules_to_save``), so the serving notes are true of the adapter actually written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .method import describe_fields
from .types import MethodInfo

CARD = "README.md"


#: The Hub's ``pipeline_tag`` of each PEFT task type (what PEFT's own cards say for a causal LM).
PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}


def _yaml_header(library: str, base: str | None, method: str, task: str | None, is_adapter: bool) -> list[str]:
    """The card's metadata: the Hub files the model under its base (``base_model:adapter:`` for an
    adapter, as PEFT's ``save_pretrained`` writes, ``base_model:finetune:`` for merged weights) and its task."""
    lines = ["---", f"library_name: {library}"]
    if base:
        lines.append(f"base_model: {base}")
    if task in PIPELINE_TAGS:
        lines.append(f"pipeline_tag: {PIPELINE_TAGS[task]}")
    relation = [f"- base_model:{'adapter' if is_adapter else 'finetune'}:{base}"] if base else []
    peft = ["- lora"] if is_adapter else []
    return [*lines, "tags:", *relation, *peft, "- hf-lowrank-plugins", f"- {method}", "---", ""]


def _training_lines(training: Mapping[str, Any] | None) -> list[str]:
    if not training:
        return ["Exported from Python (`adapted.export`); training details were not recorded.", ""]
    rows = [
        ("data", f"`{training.get('dataset', '?')}` ({training.get('data_kind', '?')} records)"),
        ("steps", training.get("steps")),
        ("learning rate", training.get("lr")),
        ("eval loss before", _num(training.get("eval_loss_before"))),
        ("eval loss after", _num(training.get("eval_loss_after"))),
    ]
    return ["| training | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows if v is not None], ""]


def _compact(value: Any) -> str:
    """A setting for a table cell: long collections (PEFT's resolved ``all-linear`` targets) as a count."""
    if isinstance(value, (set, frozenset, list, tuple)) and len(value) > 6:
        names = sorted(str(v) for v in value)
        return f"{len(names)} modules (`{names[0]}`, ...)"
    return f"`{value!r}`"


def _num(value: Any) -> str | None:
    return f"{value:.4f}" if isinstance(value, (int, float)) else None


def _settings_lines(info: MethodInfo, config: Any) -> list[str]:
    rows = []
    for field in describe_fields(info.config_class):
        value = getattr(config, field.name, None)
        if value != field.default:
            rows.append(f"| `{field.name}` | {_compact(value)} |")
    if not rows:
        return ["Every setting at its default (`hf-lowrank list --method " + info.name + "`).", ""]
    return ["| setting (others at their default) | value |", "| --- | --- |", *rows, ""]


def _serving_lines(config: Any, adapter_name: str, adapter_config: Mapping[str, Any]) -> list[str]:
    """The card's serving section: the method family's own (a config's ``serving_card_lines``, which
    the LoRA family's base defines), else the merged model, which every engine serves."""
    lines = getattr(config, "serving_card_lines", None)
    if callable(lines):
        return [*lines(adapter_name, adapter_config), ""]
    return [
        f"Serving engines load LoRA adapters only: serve this adapter merged (`hf-lowrank merge {adapter_name} "
        "--output-dir merged`) as a plain model.",
        "",
    ]


def _task(config: Any, adapter_config: Mapping[str, Any]) -> str | None:
    task = adapter_config.get("task_type") or getattr(config, "task_type", None)
    return str(getattr(task, "value", task)) if task else None


def write_model_card(
    folder: str | Path,
    role: str,
    info: MethodInfo,
    config: Any,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``folder/README.md`` for a deliverable of ``role`` (``adapter``, ``merged``, or a method's own)."""
    folder = Path(folder)
    adapter_config: dict[str, Any] = {}
    if (folder / "adapter_config.json").is_file():
        adapter_config = json.loads((folder / "adapter_config.json").read_text())
    base = adapter_config.get("base_model_name_or_path") or (training or {}).get("model")
    is_adapter = bool(adapter_config)
    title = f"# {info.name} {'adapter' if is_adapter else role} of `{base or 'the base model'}`"
    lines = [
        *_yaml_header(
            "peft" if is_adapter else "transformers", base, info.name, _task(config, adapter_config), is_adapter
        ),
        title,
        "",
        f"Trained with [hf-lowrank-plugins](https://pypi.org/project/hf-lowrank-plugins/) {info.version or ''}, "
        f"method `{info.name}` ({info.distribution or 'built in'}): {info.summary}",
        "",
    ]
    lines += _settings_lines(info, config) + _training_lines(training)
    lines += ["## Load it", ""]
    if is_adapter:
        lines += [
            "Plain PEFT (no hf-lowrank package needed):",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{folder.name}")',
            "```",
            "",
            f"With this package, the method's own config comes back too: `hf_lowrank_plugins.load_adapter(base, "
            f'"{folder.name}")`. Merge it into a plain checkpoint: `hf-lowrank merge {folder.name} --output-dir merged`.',
            "",
            *_serving_lines(config, folder.name, adapter_config),
        ]
    else:
        lines += [
            "A plain transformers checkpoint (adapters merged in); no PEFT needed:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{folder.name}")',
            "```",
            "",
            f"Serve it like any model of its architecture (`vllm serve {folder.name}`).",
            "",
        ]
    path = folder / CARD
    path.write_text("\n".join(lines))
    return path
