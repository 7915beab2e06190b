#!/usr/bin/env bash
# `make demo`: the whole product on what ships in the repository, no download.
#  1. fit -> extend -> load on the checked-in fixture trajectory, with the backtest and --method auto (seconds);
#  2. train -> jump -> train on the embedded default (tiny Llama + 2-digit addition): plain GRPO against NExt as
#     published and our next, each jump folded into the base so that checkpoint S1's own adapter and optimizer
#     resume on it, the same continuation without the jump as the control, and a jump to the true future (a small
#     budget: minutes on 2 CPU cores; benchmarks/rlvr_acceleration.py runs the full-size comparison over seeds).
# Without a terminal, progress is printed as plain lines at least every 10 seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=.demo
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== nextrap fit on the fixture trajectory: rank-1 features, every method's model, backtest of every method"
"$BIN/nextrap" fit fixtures/lora-trajectory --out "$OUT/fit" --backtest-folds 3

echo "== nextrap extend --method auto --alpha auto: the jump with the lowest backtest error (or none)"
"$BIN/nextrap" extend --fit "$OUT/fit" --method auto --alpha auto --out "$OUT/auto"

echo "== nextrap extend: NExt as published as PEFT adapters (rank r+1) for several alphas; linear merged into the base"
"$BIN/nextrap" extend --fit "$OUT/fit" --alpha 0.5:2.0:0.5 --method next-paper --out "$OUT/jumped"
"$BIN/nextrap" extend --fit "$OUT/fit" --alpha 1.5 --method linear --format merged --base fixtures/tiny-llama --out "$OUT/merged-linear"

echo "== load the jumped checkpoints"
"$BIN/python" examples/load_jumped.py fixtures/tiny-llama "$OUT/jumped/alpha-1.5" "$OUT/merged-linear"

echo "== nextrap pipeline: 200 plain GRPO steps vs 80 + jump + 40 (embedded default)"
"$BIN/nextrap" pipeline --out "$OUT/pipeline" --steps 200 --s1 80 --s2 40 --horizon 3 --eval-every 20 \
    --eval-prompts 500 --eval-samples 4 --epochs 300 --plot "$OUT/pipeline.png"
