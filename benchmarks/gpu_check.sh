#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, the test suite, then a short benchmark of every method
# and its anchor on a 1B-class SmolLM2-shaped model built from a config (width 2048, 16 layers),
# trained on the GPU by the Trainer. Meant to finish in under 10 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... to use another interpreter than .venv's
#
# Writes benchmarks/results/gpu_check.json (per variant: step time, peak GPU memory `peak_gpu_mib`,
# init time) and prints the ratio table. Stops at once when no GPU is visible: a CPU run of this
# script would measure nothing it claims to.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$PY" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_check.sh needs a CUDA GPU: torch.cuda.is_available() is False (torch " + torch.__version__ + ")")
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

# The suite: the slow tests (the real SmolLM2 runs) are left to CPU CI to keep within the budget.
# Training in the tests is pinned to the CPU (use_cpu=True), so this checks that nothing breaks on a
# CUDA machine (bitsandbytes' CUDA backend at import, device placement at load), not GPU numerics.
timeout 300 "$PY" -m pytest -q -x -m "not slow" -p no:cacheprovider

# Every method against its anchor on the GPU, a fresh process per variant, 3 measured steps.
VARIANTS=ours:lora,peft:lora,ours:dora,peft:dora,ours:qlora,peft:qlora,ours:pissa_fast,peft:pissa_fast
VARIANTS=$VARIANTS,ours:lora_ga,peft:lora_ga,ours:galore,hf:galore_adamw,ours:salor,ours:full,limit:frozen
timeout 270 "$PY" benchmarks/bench_anchors.py --width 2048 --layers 16 --steps 3 --warmup 1 \
    --batch-size 4 --seq-len 512 --only "$VARIANTS" --timeout 60 --output benchmarks/results/gpu_check.json
