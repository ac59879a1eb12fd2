"""The figures of ``hf-lowrank compare``: eval loss against step and time, and the cost of each method.

Imported only when a comparison draws its plots, so matplotlib stays an optional extra (``plots``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import atomic_file


def _save_figure(fig: Any, path: Path, note: str | None) -> Path:
    """Title ``fig`` with ``note`` (if any), write it to ``path`` as PNG atomically, close it."""
    import matplotlib.pyplot as plt

    if note:
        fig.suptitle(note, fontsize=9, color="tab:red")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def write_plots(comparison: dict[str, Any], out_dir: Path) -> list[Path]:
    """``loss_curves.png`` (eval loss vs step and vs seconds) and ``cost.png`` (peak memory, step time).

    Raises ``ImportError`` when matplotlib is missing; the caller reports it and goes on.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    ok = [r for r in comparison["results"] if r["status"] == "ok"]
    failed = [r["method"] for r in comparison["results"] if r["status"] != "ok"]
    note = f"failed (see comparison.md): {', '.join(failed)}" if failed else None
    written = []
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    # beyond ten methods the default colour cycle repeats: a twenty-colour map and a marker per method
    palette = plt.get_cmap("tab10" if len(ok) <= 10 else "tab20")
    colours = [palette(i) for i in range(palette.N)]
    markers = "osD^vP*Xph<>"
    for index, row in enumerate(ok):
        hist = row["eval_history"]
        style = {
            "marker": markers[index % len(markers)],
            "color": colours[index % len(colours)],
            "label": row["method"],
        }
        by_step.plot([e["step"] for e in hist], [e["eval_loss"] for e in hist], **style)
        by_time.plot([e["seconds"] for e in hist], [e["eval_loss"] for e in hist], **style)
    by_step.set(xlabel="step", ylabel="eval loss", title="Eval loss by step")
    by_time.set(
        xlabel="seconds (init + training steps, evaluation excluded)", ylabel="eval loss", title="Eval loss by time"
    )
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    written.append(_save_figure(fig, out_dir / "loss_curves.png", note))

    fig, (mem, step) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [r["method"] for r in ok]
    mem.bar(names, [r["peak_memory_mb"] for r in ok], color="tab:blue")
    mem.set(ylabel="MB", title="Peak memory")
    step.bar(names, [r["median_step_seconds"] or 0.0 for r in ok], color="tab:orange")
    step.set(ylabel="seconds", title="Median step time")
    for ax in (mem, step):
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    written.append(_save_figure(fig, out_dir / "cost.png", note))
    return written
