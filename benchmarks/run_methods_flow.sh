#!/usr/bin/env bash
# The flow shapes model (SD3's layout): the baseline on the whole evaluation set, what its attention maps look like,
# then every inference-time method against the baseline on the same prompts and seeds as the SD model's method table
# (20 prompts per category x 2 images), at equal NFE where the method allows, and the equal-compute table. 20
# flow-matching Euler steps, guidance 3.0. Stochastic methods sample Flow-GRPO's SDE (eta = its noise level a).
# Attend-and-Excite uses the 8x8 grid of image tokens and the official schedule scaled to 20 steps (alter 10 steps,
# thresholds at 0, 4, 8).
#   bash benchmarks/run_methods_flow.sh            # all runs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SET="--model flow --per-category 20 --seeds 2"
export TTALIGN_QUIET=1
$PY benchmarks/shapes_eval.py --model flow --name baseline > /dev/null
$PY benchmarks/attention_maps.py --model flow --per-category 40 --seeds 2 > /dev/null
run() { name=$1; shift; echo "== $name"; $PY benchmarks/shapes_eval.py --name "methods_$name" $SET "$@" > /dev/null; }
run baseline
run best_of_2 --align best_of_n:n=2,reward=shapes_soft
run best_of_4 --align best_of_n:n=4,reward=shapes_soft
run particle_steering_2 --align particle_steering:particles=2,reward=shapes_soft,eta=0.7
run particle_steering_4 --align particle_steering:particles=4,reward=shapes_soft,eta=0.7
run seed_search_4 --align seed_search:n=4,reward=shapes_soft
run reward_guidance --align reward_guidance:reward=shapes_soft,scale=5
run noise_optimization_3 --align "noise_optimization:reward=shapes_soft,steps=3,optimizer=adamw,lr=0.3,grad_clip=10"
run attend_and_excite --align "attend_and_excite:tokens=@ttalign.shapes.world:subject_words,attn_res=8x8,max_iter_to_alter=10,thresholds=0:0.05;4:0.5;8:0.8"
run region_reweight --align "region_reweight:regions=@ttalign.shapes.world:layout_regions"
$PY benchmarks/equal_compute.py --model flow > /dev/null
echo done
