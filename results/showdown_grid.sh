#!/usr/bin/env bash
# The showdown's grid (issue "Answers, not fog"): every run trained and measured once by the study runner, logged
# to results/showdown_grid.jsonl with its machine, precision, torch version, code version and wall time.
# Resumable: run this script again (in another sitting, on another machine) and only the missing runs train.
# The loop runs seed by seed over all three parts, so a sitting that stops early leaves every part at its first seeds.
#
#   bash results/showdown_grid.sh            # everything still missing, one torch thread (a core stays free)
#   THREADS=2 bash results/showdown_grid.sh  # both cores, nothing else running
#   DRY=1 bash results/showdown_grid.sh      # list what is logged and what is still to run
set -euo pipefail
cd "$(dirname "$0")/.."
export PEFT_LAB_RUNLOG="$PWD/results/showdown_grid.jsonl" HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
STUDY=("$PY" -m peft_lab.study --threads "${THREADS:-1}" ${DRY:+--dry-run})

for seed in 0 1 2; do
    # 1. review topics (6-way), the notebooks' budget: 60 steps of 8, every run scored on all 640 test reviews
    "${STUDY[@]}" --task review_domain --steps 60 --seeds "$seed" --recipes full          --lrs 1e-5 3e-5 1e-4
    "${STUDY[@]}" --task review_domain --steps 60 --seeds "$seed" --recipes lora-qv       --lrs 3e-4 1e-3 3e-3
    "${STUDY[@]}" --task review_domain --steps 60 --seeds "$seed" --recipes lora-all      --lrs 1e-4 3e-4 1e-3
    # prefix was best at the top of its first range (1e-2 on seed 0), so it gets a fourth, higher rate
    "${STUDY[@]}" --task review_domain --steps 60 --seeds "$seed" --recipes prefix        --lrs 1e-3 3e-3 1e-2 3e-2
    "${STUDY[@]}" --task review_domain --steps 60 --seeds "$seed" --recipes prompt        --lrs 3e-3 1e-2 3e-2
    # 2. new facts: 64 invented facts, 64 steps of 8 (eight passes), learning rate chosen on each fact's validation question
    "${STUDY[@]}" --task facts --facts 64 --steps 64 --seeds "$seed" --recipes full     --lrs 1e-5 3e-5 1e-4 3e-4
    "${STUDY[@]}" --task facts --facts 64 --steps 64 --seeds "$seed" --recipes lora-all --lrs 1e-4 3e-4 1e-3 3e-3
    # 3. little data: training sets the 60 steps of 8 actually see (480 examples = one pass), at each method's middle lr
    "${STUDY[@]}" --task review_domain --steps 60 --seeds "$seed" --train-sizes 8 32 128 480 --recipes lora-qv --lrs 1e-3
    "${STUDY[@]}" --task review_domain --steps 60 --seeds "$seed" --train-sizes 8 32 128 480 --recipes full    --lrs 3e-5
done
