#!/usr/bin/env bash
# The SD3 / FLUX benchmarks: no-method overhead against each diffusers parent, and Attend-and-Excite's cost on joint
# attention. Run alone on the machine (timings).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
$PY benchmarks/overhead.py --rounds 60 --steps 10 --family sd3
$PY benchmarks/overhead.py --rounds 60 --steps 10 --family flux
$PY benchmarks/attend_excite_flow.py --family sd3 --size 512 --steps 4 --prompts 2
$PY benchmarks/attend_excite_flow.py --family flux --size 512 --steps 4 --prompts 2
