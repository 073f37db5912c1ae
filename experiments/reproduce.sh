#!/usr/bin/env bash
# Every result of the README's "Results at toy scale" (and its training curves), in order, each
# step timed. About 3 h 20 min on 2 CPU cores: an hour for shapes, tables 1-3 and the streaming
# benchmark, 2 h 10 min for the four video runs (learning.py trains them, video.py reads them).
# Runs already finished under runs/ are not run again and an interrupted one goes on from its last
# checkpoint, so an interrupted reproduction continues where it stopped (delete runs/ to start over).
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
step python experiments/video.py
step python stream.py --compare=runs/video/ca-s1/ckpt.pt,runs/video/insertion-s1/ckpt.pt --clip=0-39 --fps=20 --clip_prompts --one_stream --sink_tokens=4 --recent_tokens=64 --threads=1 --compare_png=docs/live_compare.png
step python experiments/video.py --bounded=runs/video/ca-s1/ckpt.pt --sink_tokens=4 --recent_tokens=16,32,64,128,256,0
step python experiments/accuracy.py --tasks=shapes
step python experiments/adaptation.py
step python experiments/own_data.py
step python experiments/attention.py
step python stream.py --bench --json runs/stream.json --png docs/stream.png
echo "=== all done in $(( SECONDS / 60 )) min"
