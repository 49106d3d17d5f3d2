#!/usr/bin/env bash
# Issue 19's evidence at the mini preset, in the issue's order: Table 6 seed 0 (a table of its own), Table 6's
# three seeds, Table 7 (= Table 6 at this scale: all reused), Table 9 (black-box attacks on Table 6's seed-0
# runs), Tables 2-4 (Table 2: seeds 0-2, Tables 3-4: seed 0; their TRADES and TRADES-SI s=15/m=0.2/β=0.2 rows
# are Table 6's runs), then Table 10 (TRADES-HE trained, seeds 0-2; TRADES and TRADES-SI are Table 6's runs),
# then Table 8 (the single-step defenses, seeds 0-2), then the figures on Table 6's runs (Figs. 4 and 5: seeds
# 0-2; figures are computed by one process).
# Every step resumes where it stopped: run the same command again. After each table:
#   python scripts/collect_reproduction.py OUT && git add benchmarks/reproduction docs && git commit
# Usage: nice -n 10 scripts/run_evidence_grid.sh [OUT] [JOBS]   (default runs/reproduce, 2 jobs)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/reproduce}"
JOBS="${2:-2}"
FIG=(.venv/bin/sirobust reproduce --out "$OUT" --no-progress --preset mini)
RUN=("${FIG[@]}" --jobs "$JOBS")
set -x
"${RUN[@]}" table6 --seeds 0
"${RUN[@]}" table6
"${RUN[@]}" table7
"${RUN[@]}" table9
for t in table2 table3 table4 table10 table8; do "${RUN[@]}" "$t"; done
for f in fig1 fig3 fig4 fig5; do "${FIG[@]}" "$f"; done
