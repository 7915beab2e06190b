#!/usr/bin/env bash
# The GPU check (issue 10), one script under 5 minutes on one GPU: the CUDA-marked tests (the GPU path against
# the CPU result), then the 7B-shaped LoRA benchmark (fit with and without backtest, extend, read floor, peak
# RSS) and next-paper's predictor at 7B shapes, on the GPU. Each prints its table; paste them into RESULTS.md.
#
#   bash benchmarks/gpu_check.sh                 # on a machine with CUDA
#   LAYERS=8 bash benchmarks/gpu_check.sh        # a smaller slice
#
# Without a CUDA device it runs its CPU fallback, which .ci/run runs on every push so that the script itself
# keeps working: the same tests CPU against CPU (NEXTRAP_TEST_DEVICE=cpu), and both benchmarks on a one-layer
# slice at rank 8.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=$(mktemp -d "${TMPDIR:-/tmp}/nextrap-gpu-check.XXXXXX")
trap 'rm -rf "$DATA"' EXIT

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    DEVICE=cuda LAYERS=${LAYERS:-28} RANK=${RANK:-64} CKPTS=${CKPTS:-16} EPOCHS=${EPOCHS:-50}
    "$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB')"
    "$PY" -m pytest -q -m cuda tests/test_cuda.py
else
    DEVICE=cpu LAYERS=${LAYERS:-1} RANK=${RANK:-8} CKPTS=${CKPTS:-12} EPOCHS=${EPOCHS:-2}
    echo "no CUDA device: the CPU fallback (tests CPU against CPU; benchmarks on $LAYERS layer(s) at rank $RANK)"
    NEXTRAP_TEST_DEVICE=cpu "$PY" -m pytest -q -m cuda tests/test_cuda.py
fi

set -x
"$PY" benchmarks/lora_scale.py --data "$DATA" --layers "$LAYERS" --checkpoints "$CKPTS" --rank "$RANK" \
    --max-memory 2GB --device "$DEVICE" --skip dense
"$PY" benchmarks/next_paper_scale.py --layers "$LAYERS" --epochs 1000 --time-epochs "$EPOCHS" --variants batched \
    --device "$DEVICE"
