#!/usr/bin/env bash
# The GPU check in one command, from the repository root, with nothing installed: see benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh            # on a CUDA device: writes benchmarks/gpu.md (under 8 minutes on an H100)
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
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
