#!/usr/bin/env bash
# The GPU check in one command, from the repository root, with nothing installed: see benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh            # on a CUDA device: writes benchmarks/gpu.md (at most --budget 450 s)
#   bash benchmarks/gpu_check.sh --quick    # the smoke test, also on a CPU
# Peers, optional, carried in the ignored folder benchmarks/peers/ (docs/speed.md says how to fetch them):
#   benchmarks/peers/*.whl          pure-Python wheels (torchattacks), imported from the zip as they are
#   benchmarks/peers/auto-attack/   a copy of github.com/fra31/auto-attack (the reference AutoAttack)
# PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
path="src:benchmarks"
for wheel in benchmarks/peers/*.whl; do
    [ -e "$wheel" ] && path="$path:$wheel"
done
[ -d benchmarks/peers/auto-attack/autoattack ] && path="$path:benchmarks/peers/auto-attack"
export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}"
# torch.compile's caches in a folder that is surely writable (HOME may not be), and cuBLAS's workspace as
# deterministic training needs it, set before any handle exists
cache="${TMPDIR:-/tmp}/sirobust-gpu-check-cache"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$cache/triton}" TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$cache/inductor}"
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
