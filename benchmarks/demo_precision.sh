#!/usr/bin/env bash
# 150 optimizer steps of the demo recipe (configs/mae_vit_tiny_fmnist.yaml) at one trainer.precision, with the
# online probe, reconstructions and closing table off: a whole process to time against the other precision,
# interleaved (A B A B ...), the ratio taken pair by pair. Prints the run's own "done: ... images/s" line.
#
#     benchmarks/demo_precision.sh bf16-mixed      # or 32-true
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
precision=${1:?usage: demo_precision.sh PRECISION (32-true or bf16-mixed)}
out=$(mktemp -d "${TMPDIR:-/tmp}/mimkit-precision.XXXX")
trap 'rm -rf "$out"' EXIT
"$PY" -m mimkit pretrain --config configs/mae_vit_tiny_fmnist.yaml optim.max_steps=150 "trainer.precision=$precision" \
  eval.online_probe_every_steps=null eval.baseline_table=false eval.visualize=false eval.recon_every_epochs=0 \
  trainer.progress=false "trainer.out_dir=$out" trainer.run_name=r data.val_fraction=0.01 2>&1 | grep '^done:'
