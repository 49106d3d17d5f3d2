#!/usr/bin/env bash
# The evidence grid's next seeds, with every finished evaluation filed in the committed ledger
# (benchmarks/reproduction/ledger; sirobust.reproduce.ledger) as soon as it exists, so that the work outlives
# the machine: commit the ledger whenever entries appear. On any machine the same command trains only the runs
# whose evaluations the ledger lacks, and writes each table once every cell is there.
#   Table 3 and Table 4 over training seeds 0, 1 and 2 (their committed tables have seed 0 alone, computed on a
#   machine that is gone; their TRADES and default TRADES-SI rows are Table 6's runs, shared), then Table 6
#   over seeds 0-4 (three seeds rarely show a difference that survives Holm's correction; five can).
#   Between them, Fig. 4 over Table 6's seeds 0-2 and 4 directions (its weights are Table 3's TRADES and m = 0.2
#   runs, already trained; a figure is drawn from the weights, so it is not in the ledger: commit its result).
# Each cell's evaluations run as soon as its run is trained. After a table:
#   python scripts/collect_reproduction.py OUT && git add benchmarks/reproduction docs && git commit
# Usage: nice -n 19 scripts/run_seed_grid.sh [OUT] [JOBS]   (default runs/reproduce, 2 jobs)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/reproduce}"
JOBS="${2:-2}"
RUN=(.venv/bin/sirobust reproduce --out "$OUT" --no-progress --preset mini --jobs "$JOBS"
     --ledger benchmarks/reproduction/ledger)
set -x
"${RUN[@]}" table3 --seeds 0,1,2
"${RUN[@]}" table4 --seeds 0,1,2
"${RUN[@]}" fig4
"${RUN[@]}" table6 --seeds 0,1,2,3,4
# Table 9 (black-box) over seeds 0-2, on the Table 6 models the step above trained here (its committed table's
# runs were trained on a machine that is gone, before the ledger existed; SPSA and RayS need the weights)
"${RUN[@]}" table9 --seeds 0,1,2
