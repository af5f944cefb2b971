#!/usr/bin/env bash
# The shapes-world method benchmark: every inference-time method against the baseline on the same prompts and
# seeds (20 prompts per category x 2 images), then the equal-compute table and plot. Attend-and-Excite uses the
# 8x8 maps of the 16x16 latents and the official schedule scaled to 25 steps (alter 12 steps, thresholds at 0, 5, 10).
#   bash benchmarks/run_methods.sh            # all runs (about 25 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SET="--per-category 20 --seeds 2"
export TTALIGN_QUIET=1
run() { name=$1; shift; echo "== $name"; $PY benchmarks/shapes_eval.py --name "methods_$name" $SET "$@" > /dev/null; }
run baseline
run best_of_2 --align best_of_n:n=2,reward=shapes_soft
run best_of_4 --align best_of_n:n=4,reward=shapes_soft
run particle_steering_2 --align particle_steering:particles=2,reward=shapes_soft
run particle_steering_4 --align particle_steering:particles=4,reward=shapes_soft
run seed_search_4 --align seed_search:n=4,reward=shapes_soft
run reward_guidance --align reward_guidance:reward=shapes_soft,scale=5
run noise_optimization_3 --align "noise_optimization:reward=shapes_soft,steps=3,optimizer=adamw,lr=0.3,grad_clip=10"
run attend_and_excite --align "attend_and_excite:tokens=@ttalign.shapes.world:subject_words,attn_res=8x8,max_iter_to_alter=12,thresholds=0:0.05;5:0.5;10:0.8"
run region_reweight --align "region_reweight:regions=@ttalign.shapes.world:layout_regions"
$PY benchmarks/equal_compute.py > /dev/null
echo done
