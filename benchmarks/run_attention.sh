#!/usr/bin/env bash
# The shapes-world attention-control benchmark: Attend-and-Excite and region re-weighting against the baseline on
# the categories they address (two objects, position, colour attribution), 40 prompts per category x 4 images, same
# seeds for every run. Attend-and-Excite uses the 8x8 maps of the 16x16 latents and the official schedule scaled to
# 25 steps (alter 12 steps, thresholds at 0, 5, 10). Region re-weighting gives each phrase of a position prompt the
# half of the image its relation puts it in (`layout_regions`), with DenseDiffusion's published defaults, with and
# without encoding each phrase on its own, with three times the cross-attention weight, and together with
# Attend-and-Excite.
#   bash benchmarks/run_attention.sh            # about 15 minutes on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SET="--categories two_objects,position,color_attribution --per-category 40 --seeds 4"
REGIONS="region_reweight:regions=@ttalign.shapes.world:layout_regions"
AE="attend_and_excite:tokens=@ttalign.shapes.world:subject_words,attn_res=8x8,max_iter_to_alter=12,thresholds=0:0.05;5:0.5;10:0.8"
export TTALIGN_QUIET=1
run() { name=$1; shift; echo "== $name"; $PY benchmarks/shapes_eval.py --name "attention_$name" $SET "$@" > /dev/null; }
run baseline
run attend_and_excite --align "$AE"
run region_reweight --align "$REGIONS"
run region_reweight_in_context --align "$REGIONS,encode_phrases=false"
run region_reweight_cross3 --align "$REGIONS,cross_weight=3"
run attend_and_excite_region_reweight --align "$AE" --align "$REGIONS"
$PY benchmarks/attention_table.py
echo done
