#!/usr/bin/env bash
# Region re-weighting on fresh position captions: DenseDiffusion's reference keeps the prompt's own phrase embeddings
# for every model but SD 1.5 (`encode_phrases=false` here), the setting that moved position accuracy most in
# `run_attention.sh`. This run tests it, and the SD-1.5 choice, on 200 other position captions (prompt seed 99) x 4
# images against the baseline, paired image by image (then `python benchmarks/attention_table.py --prefix confirm`).
#   bash benchmarks/run_region_confirm.sh       # about 6 minutes on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SET="--categories position --per-category 200 --seeds 4 --prompt-seed 99"
REGIONS="region_reweight:regions=@ttalign.shapes.world:layout_regions"
export TTALIGN_QUIET=1
run() { name=$1; shift; echo "== $name"; $PY benchmarks/shapes_eval.py --name "confirm_$name" $SET "$@" > /dev/null; }
run baseline
run region_reweight_in_context --align "$REGIONS,encode_phrases=false"
run region_reweight --align "$REGIONS"
$PY benchmarks/attention_table.py --prefix confirm
echo done
