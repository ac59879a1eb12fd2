"""The comparison's reports: ratios to the reference method, the markdown table, and the files written
atomically after every method (``comparison.json``, ``comparison.md`` and the plots)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from ..io import write_json_atomic, write_text_atomic
from .spec import DEFAULT_MAX_STEPS

#: Learning rate per method when ``--lr`` does not name one, with the reason (shown in comparison.md).
#: Figures compared as ratios to the reference method (key in a method's result -> label).
RATIO_FIELDS = {
    "trainable_params": "trainable params",
    "init_seconds": "init s",
    "median_step_seconds": "median step s",
    "peak_memory_mb": "peak memory MB",
    "eval_loss": "eval loss",
    "artifact_bytes": "artifact MB",
}


def format_lr(lr: float) -> str:
    """``2e-4`` rather than ``0.0002``: learning rates are read in powers of ten."""
    mantissa, exponent = f"{lr:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def format_seconds(seconds: float) -> str:
    """``75.2`` -> ``1m15s``, ``9.6`` -> ``10s``: how long a run took, in progress lines and reports."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def add_ratios(rows: list[dict[str, Any]], reference: str) -> None:
    """Set ``row["ratios"][field] = value / reference's value`` for every figure both rows have."""
    ref = next((r for r in rows if r["method"] == reference and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] != "ok":
            continue
        row["ratios"] = {
            key: row[key] / ref[key] if ref and row.get(key) is not None and ref.get(key) else None
            for key in RATIO_FIELDS
        }


def machine_description() -> dict[str, Any]:
    """Where the figures were measured (they mean little without it)."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "processor": platform.processor(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "trainable_params":
        text = f"{value:,}"
    elif key == "artifact_bytes":
        text = f"{value / 2**20:.1f}"
    elif key in ("eval_loss",):
        text = f"{value:.4f}"
    elif key == "peak_memory_mb":
        text = f"{value:.0f}"
    else:
        text = f"{value:.3g}"
    ratio = row.get("ratios", {}).get(key)
    return f"{text} ({ratio:.2f}x)" if ratio is not None else text


def run_length(shared: dict[str, Any]) -> str:
    """How long each method trained, as the run's settings say (``--max-steps``, ``--epochs`` or the default)."""
    if shared.get("max_steps") is not None:
        return f"{shared['max_steps']} steps"
    if shared.get("epochs") is not None:
        return f"{shared['epochs']:g} epoch(s)"
    return f"{DEFAULT_MAX_STEPS} steps"


def render_markdown(comparison: dict[str, Any]) -> str:
    """``comparison.md``: the main table with ratios, eval loss per step, learning rates and errors."""
    s, rows, ref = comparison["shared_settings"], comparison["results"], comparison["reference"]
    m = comparison["machine"]
    lines = [
        "# Method comparison",
        "",
        f"Model `{s['model'] or 'SmolLM2-135M-Instruct (embedded)'}`, data `{s['dataset'] or 'KJV (embedded)'}`; "
        f"{run_length(s)} of {s['batch_size']} x {s['seq_len']} tokens (grad accum {s['grad_accum']}), seed {s['seed']}, "
        f"rank {s['rank'] if s['rank'] is not None else 'per-method default'}; eval every {s['eval_every'] or '-'} steps on "
        f"{s['eval_blocks']} held-out blocks{'; every method on a 4-bit NF4 base' if s.get('load_in_4bit') else ''}. "
        f"Each method ran in a fresh process. Ratios `(1.00x)` are to **{ref}**.",
        "",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs{', ' + m['cuda_device'] if 'cuda_device' in m else ''}, "
        f"torch {m['torch']}. Peak memory is the process's peak RSS (CPU) or CUDA allocator peak (GPU); init s is "
        "attach() plus data-dependent initialisation; median step s excludes 2 warm-up steps and evaluation.",
        "",
        "| method | lr | " + " | ".join(RATIO_FIELDS.values()) + " |",
        "|---|---|" + "---|" * len(RATIO_FIELDS),
    ]
    for row in rows:
        if row["status"] != "ok":
            error = " ".join(str(row["error"]).split()).replace("|", "\\|")
            lines.append(
                f"| {row['method']} | {format_lr(row['lr'])} | failed: {error} |" + " |" * (len(RATIO_FIELDS) - 1)
            )
            continue
        lines.append(
            f"| {row['method']} | {format_lr(row['lr'])} | " + " | ".join(_cell(row, k) for k in RATIO_FIELDS) + " |"
        )
    ok = [r for r in rows if r["status"] == "ok"]
    steps = sorted({e["step"] for r in ok for e in r["eval_history"]})
    if ok:
        lines += [
            "",
            "## Eval loss by step",
            "",
            "| method | " + " | ".join(f"step {st}" for st in steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        for row in ok:
            by_step = {e["step"]: e["eval_loss"] for e in row["eval_history"]}
            lines.append(
                f"| {row['method']} | "
                + " | ".join(f"{by_step[st]:.4f}" if st in by_step else "-" for st in steps)
                + " |"
            )
    lines += ["", "## Learning rates and settings", ""]
    for row in rows:
        extra = f"; settings {json.dumps(row['settings'])}" if row["settings"] else ""
        lines.append(f"- **{row['method']}**: {format_lr(row['lr'])} ({row['lr_source']}){extra}")
    for note in comparison.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def write_reports(comparison: dict[str, Any], out_dir: Path) -> None:
    """Write ``comparison.json`` and ``comparison.md`` atomically."""
    write_json_atomic(out_dir / "comparison.json", comparison)
    write_text_atomic(out_dir / "comparison.md", render_markdown(comparison))
