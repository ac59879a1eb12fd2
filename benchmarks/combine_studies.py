"""Draw one set of study plots from several ``hf-lowrank compare`` runs with the same settings.

    .venv/bin/python benchmarks/combine_studies.py OUT_DIR RUN/comparison.json [RUN2/comparison.json ...]

Methods added after a study run in their own ``compare`` invocation with the study's command; this
puts their rows beside the study's (a method present in several files is taken from the first) and
writes ``OUT_DIR/comparison_all.json``, ``loss_curves.png`` and ``cost.png`` with
``hf_lowrank_plugins.app.plots`` (the figures ``compare`` itself draws). Runs whose shared settings
differ are refused: their curves would not be comparable. The rows of a run on a 4-bit base
(``compare --load-in-4bit``) are labelled ``METHOD (4-bit)``, so QLoRA-GA stands beside LoRA-GA.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

#: settings that must agree for curves to share axes (model, data, budget, seed, rank)
COMPARED = ("model", "dataset", "max_steps", "batch_size", "seq_len", "seed", "eval_every", "eval_blocks", "rank")


def main() -> None:
    """Combine the files named on the command line."""
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out_dir, sources = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    documents = [json.loads(path.read_text()) for path in sources]
    first = documents[0]["shared_settings"]
    for path, document in zip(sources[1:], documents[1:], strict=True):
        differing = [k for k in COMPARED if document["shared_settings"].get(k) != first.get(k)]
        if differing:
            sys.exit(f"{path}: {', '.join(differing)} differ from {sources[0]}'s; curves would not be comparable")
    seen: set[str] = set()
    results = []
    for document in documents:
        four_bit = bool(document["shared_settings"].get("load_in_4bit"))
        for row in document["results"]:
            label = f"{row['method']} (4-bit)" if four_bit else row["method"]
            if label not in seen:
                seen.add(label)
                results.append({**row, "method": label})
    combined = {**documents[0], "results": results, "methods_planned": [r["method"] for r in results]}
    combined["sources"] = [str(p) for p in sources]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison_all.json").write_text(json.dumps(combined, indent=2))
    from hf_lowrank_plugins.app.plots import write_plots

    for path in write_plots(combined, out_dir):
        print(f"wrote {path}")
    print(f"wrote {out_dir / 'comparison_all.json'} ({len(results)} methods)")


if __name__ == "__main__":
    main()
