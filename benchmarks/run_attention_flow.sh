#!/usr/bin/env bash
# Attention control on the flow shapes model's joint attention: Attend-and-Excite and region re-weighting against
# the baseline on the categories they address (two objects, position, colour attribution), 40 prompts per category x
# 4 images, same seeds for every run, as run_attention.sh for the SD model. A&E: the official schedule scaled to 20
# steps (alter 10, thresholds at 0, 4, 8); region re-weighting: each phrase of a position prompt gets the half of the
# image its relation names (`layout_regions`), as logit biases on the joint sequence; also with three times the weight.
#   bash benchmarks/run_attention_flow.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SET="--model flow --categories two_objects,position,color_attribution --per-category 40 --seeds 4"
REGIONS="region_reweight:regions=@ttalign.shapes.world:layout_regions"
AE="attend_and_excite:tokens=@ttalign.shapes.world:subject_words,attn_res=8x8,max_iter_to_alter=10,thresholds=0:0.05;4:0.5;8:0.8"
export TTALIGN_QUIET=1
run() { name=$1; shift; echo "== $name"; $PY benchmarks/shapes_eval.py --name "attention_$name" $SET "$@" > /dev/null; }
run baseline
run attend_and_excite --align "$AE"
run region_reweight --align "$REGIONS"
run region_reweight_cross3 --align "$REGIONS,cross_weight=3"
$PY benchmarks/attention_table.py --prefix flow_attention
echo done
