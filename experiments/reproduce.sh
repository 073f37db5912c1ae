#!/usr/bin/env bash
# Every result of the README's "Results at toy scale" (and its training curves), in order, each
# step timed. About an hour on 2 CPU cores. Runs already finished under runs/ are not run again, so an
# interrupted reproduction continues where it stopped (delete runs/ to start over).
#
#     bash experiments/reproduce.sh 2>&1 | tee reproduce.log
set -euo pipefail
cd "$(dirname "$0")/.."
step() {
    local start=$SECONDS
    echo "=== $*"
    "$@"
    echo "=== $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s: $*"
}
step python experiments/draw_masks.py --out docs/masks.png
step python experiments/efficiency.py
step python experiments/learning.py
step python experiments/accuracy.py --tasks=shapes
step python experiments/adaptation.py
step python experiments/attention.py
step python stream.py --bench --json runs/stream.json --png docs/stream.png
echo "=== all done in $(( SECONDS / 60 )) min"
