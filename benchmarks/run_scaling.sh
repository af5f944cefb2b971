#!/usr/bin/env bash
# Compute scaling and over-optimization on the SD shapes model (about 55 minutes on 2 CPU cores): noise optimization's
# per-iteration record on both rewards (the over-optimization monitors), then the scaling curves of every method.
#   bash benchmarks/run_scaling.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export TTALIGN_QUIET=1
COMPOSITE=counting,two_objects,position,color_attribution
for reward in shapes_soft shapes_clip; do
  echo "== overoptimization $reward"
  $PY benchmarks/overoptimization.py --reward $reward --iterations 15 --batch-prompts 16 --categories $COMPOSITE > /dev/null
done
echo "== compute scaling"
$PY benchmarks/compute_scaling.py
echo done
