#!/usr/bin/env bash
# The demo recipe's evidence over pretraining seeds (issue 14): pretrain configs/mae_vit_tiny_fmnist.yaml once
# per seed (without its closing table), then score each run on the test split next to random init and raw
# pixels (benchmarks/small_compute.py evidence: one JSON per seed, skipped when present), then docs/results.md.
# Resumable: a seed whose JSON exists is skipped; a seed whose run was cut short continues from its checkpoint.
#
#     benchmarks/demo_evidence.sh [SEEDS...]        # default: 0 1 2; runs go to $RUNS (default runs/evidence)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/evidence}
SEEDS=${*:-0 1 2}
for seed in $SEEDS; do
  json=benchmarks/results/small_compute/evidence/demo/demo-s$seed.json
  [ -f "$json" ] && { echo "seed $seed: $json exists, skipped"; continue; }
  run=$RUNS/demo-s$seed
  if [ -f "$run/checkpoints/last.ckpt" ]; then
    "$PY" -m mimkit pretrain --resume "$run" || true   # a finished run has nothing left to do
  else
    "$PY" -m mimkit pretrain --config configs/mae_vit_tiny_fmnist.yaml "trainer.seed=$seed" \
      "trainer.out_dir=$RUNS" "trainer.run_name=demo-s$seed" eval.baseline_table=false
  fi
  "$PY" benchmarks/small_compute.py evidence --recipe demo --runs "$run"
done
"$PY" benchmarks/render_results.py
