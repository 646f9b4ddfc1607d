#!/usr/bin/env bash
# A recipe's evidence over pretraining seeds (issue 14): pretrain the recipe once per seed (without its closing
# table), then score each run on the test split next to random init and raw pixels (benchmarks/small_compute.py
# evidence: one JSON per seed, skipped when present), then docs/results.md.
# Resumable: a seed whose JSON exists is skipped; a seed whose run was cut short continues from its checkpoint.
#
#     benchmarks/demo_evidence.sh [SEEDS...]             # the demo recipe; default seeds 0 1 2
#     RECIPE=long benchmarks/demo_evidence.sh 0 1 2      # configs/mae_vit_tiny_fmnist_long.yaml
# Runs go to $RUNS (default runs/evidence).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/evidence}
SEEDS=${*:-0 1 2}
RECIPE=${RECIPE:-demo}
case $RECIPE in
  demo) CONFIG=configs/mae_vit_tiny_fmnist.yaml ;;
  long) CONFIG=configs/mae_vit_tiny_fmnist_long.yaml ;;
  *) echo "RECIPE=$RECIPE: choose demo or long" >&2; exit 2 ;;
esac
for seed in $SEEDS; do
  json=benchmarks/results/small_compute/evidence/$RECIPE/$RECIPE-s$seed.json
  [ -f "$json" ] && { echo "seed $seed: $json exists, skipped"; continue; }
  run=$RUNS/$RECIPE-s$seed
  if [ -f "$run/checkpoints/last.ckpt" ]; then
    "$PY" -m mimkit pretrain --resume "$run" || true   # a finished run has nothing left to do
  else
    "$PY" -m mimkit pretrain --config "$CONFIG" "trainer.seed=$seed" \
      "trainer.out_dir=$RUNS" "trainer.run_name=$RECIPE-s$seed" eval.baseline_table=false
  fi
  "$PY" benchmarks/small_compute.py evidence --recipe "$RECIPE" --runs "$run"
done
"$PY" benchmarks/render_results.py
