#!/usr/bin/env bash
# `make demo`: the core pipeline on the checked-in fixture trajectory (17 LoRA checkpoints of a tiny Llama):
# fit -> extend (adapter, several alphas; merged model) -> load the jumped checkpoints and generate.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=.demo
rm -rf "$OUT"

echo "== nextrap fit: rank-1 features, NExt predictor, backtest"
"$BIN/nextrap" fit fixtures/lora-trajectory --out "$OUT/fit" --backtest-folds 3

echo "== nextrap extend: NExt jump as PEFT adapters (rank r+1), alpha 0.5..2.0"
"$BIN/nextrap" extend --fit "$OUT/fit" --alpha 0.5:2.0:0.5 --out "$OUT/jumped"

echo "== nextrap extend --method auto --alpha auto: the jump with the lowest backtest error (or none)"
"$BIN/nextrap" extend --fit "$OUT/fit" --method auto --alpha auto --out "$OUT/auto"

echo "== nextrap extend: straight-line jump merged into the base model"
"$BIN/nextrap" extend --fit "$OUT/fit" --alpha 1.5 --method linear --format merged --base fixtures/tiny-llama --out "$OUT/merged-linear"

echo "== load the jumped checkpoints"
"$BIN/python" examples/load_jumped.py fixtures/tiny-llama "$OUT/jumped/alpha-1.5" "$OUT/merged-linear"
