#!/usr/bin/env bash
# The headline table: the strongest test-time methods on the whole evaluation set of the SD shapes model
# (240 prompts x 4 seeds = 960 images per run), each with the soft verifier (the judge's differentiable copy: the best
# case) and with the shapes CLIP (a learned reward that is not the judge: the honest case) as the optimized signal,
# paired with the plain run image by image; then the table and plot. With the shapes CLIP (100 x cosine), particle
# steering's lambda is divided by 100 (the soft verifier's lambda 10 -> 0.1).
#   bash benchmarks/run_headline.sh           # about an hour on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SET=${SET:-"--per-category 40 --seeds 4"}
export TTALIGN_QUIET=1
run() { name=$1; shift; echo "== $name $(date +%T)"; $PY benchmarks/shapes_eval.py --name "headline_$name" $SET "$@" > /dev/null; }
run baseline
B="--baseline headline_baseline"
run best_of_4_soft $B --align best_of_n:n=4,reward=shapes_soft
run best_of_4_clip $B --align best_of_n:n=4,reward=shapes_clip
run particle_steering_4_soft $B --align particle_steering:particles=4,reward=shapes_soft,lmbda=10
run particle_steering_4_clip $B --align particle_steering:particles=4,reward=shapes_clip,lmbda=0.1
run reward_guidance_soft $B --align reward_guidance:reward=shapes_soft,scale=5
$PY benchmarks/equal_compute.py --set headline > /dev/null
echo "done $(date +%T)"
