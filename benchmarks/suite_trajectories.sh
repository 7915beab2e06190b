#!/usr/bin/env bash
# Real GRPO trajectories for benchmarks/backtest_suite.py: different ranks, batch sizes, learning rates,
# advantage estimators, target modules and seeds on the embedded addition task (about 2-6 min each on 2 cores).
#   bash benchmarks/suite_trajectories.sh [OUT_ROOT]      (default .bench/suite; existing runs are kept)
set -euo pipefail
root="${1:-.bench/suite}"
py="${PYTHON:-.venv/bin/python}"
mkdir -p "$root"
run() {  # name, then nextrap grpo options
  local name="$1"; shift
  if [ -f "$root/$name/step_200/adapter_config.json" ]; then echo "keep $root/$name"; return; fi
  echo "run  $root/$name: $*"
  "$py" -m nextrap.cli grpo --out "$root/$name" --steps 200 --save-every 10 --eval-every 0 --overwrite "$@" > "$root/$name.log" 2>&1
}
run r8-b16-lr3e-4 --lora-r 8 --lora-alpha 16 --batch-prompts 16 --lr 3e-4 --seed 0     # TESTBED's noise-dominated trap
run r16-b32-lr1e-4 --lora-r 16 --lora-alpha 32 --batch-prompts 32 --lr 1e-4 --seed 1
run r64-b64-rloo --lora-r 64 --lora-alpha 32 --batch-prompts 64 --lr 1e-4 --advantage rloo --seed 5
run r32-b64-qv-rpp --lora-r 32 --lora-alpha 32 --batch-prompts 64 --lr 2e-4 --target-modules q_proj,v_proj --advantage reinforce++ --seed 6
