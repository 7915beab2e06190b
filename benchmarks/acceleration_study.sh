#!/usr/bin/env bash
# Issue 11's acceleration study on the embedded default (tiny Llama, 2-digit addition), unattended:
# >= 4 paired seeds, plain GRPO for 400 steps (64 prompts x 8, LoRA r 64, checkpoints every 10 steps,
# eval every 25 steps on 1000 held-out prompts x 8 samples), every arm's speed-up with its standard error.
#
#   bash benchmarks/acceleration_study.sh              # seeds 0 1 2 3 into .bench/issue11
#   SEEDS="0 1 2 3 4 5" WORK=.bench/issue11b bash benchmarks/acceleration_study.sh
#
# Part 1 (one pipeline per seed): plain 400; S1 150 + jump + S2 100 (the paper's schedule) for NExt as
# published (next-paper) and linear at alpha 1.5, folded into the base (checkpoint 150's own adapter and AdamW
# state go on, rank 64); the same two with alpha chosen by reward among 0.5..2.0 on 256 training prompts held
# out of every arm's training; the no-jump control; the true future (plain's step 200); and both methods
# jumping in place every 50 steps for 250 steps. Part 2 reuses part 1's plain runs: the backtest's method and
# alpha (auto, horizon 2) at step 150 and jumping every 30 and every 50 steps, for linear and next (a jump is
# made when the checkpoints since the last one allow a backtest: 2h + 1 of them).
# Each part prints a markdown table (mean ± se over seeds: accuracy, plain-equivalent steps, speed-up with the
# jump time counted) into WORK/*.md. A finished seed is reused (pipeline.json), so a rerun resumes where an
# interrupted one stopped. Part 1 measured 46-96 minutes per seed (two seeds at a time on 2 shared cores, load 3-7;
# results: benchmarks/RESULTS.md section 7); part 2 has not been run yet.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-"0 1 2 3"}
WORK=${WORK:-.bench/issue11}
mkdir -p "$WORK"
set -x

# shellcheck disable=SC2086  # SEEDS is a list of words
"$PY" benchmarks/rlvr_acceleration.py --seeds $SEEDS --steps 400 --work "$WORK/paper" \
    --methods next-paper,linear --alpha 1.5 --horizon 5 --jump-format base \
    --schedules 50 --alpha-by-reward 0.5,1.0,1.5,2.0 --select-prompts 256 | tee "$WORK/paper.md"

# shellcheck disable=SC2086
"$PY" benchmarks/rlvr_acceleration.py --seeds $SEEDS --steps 400 --work "$WORK/auto" \
    --methods linear,next --alpha auto --horizon 2 --jump-format base --schedules 30,50 --select-prompts 256 \
    --plain-from "$WORK/paper/seed-{seed}/plain" | tee "$WORK/auto.md"
