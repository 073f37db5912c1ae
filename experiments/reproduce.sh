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
step python -m experiments.draw_masks --out=docs/masks.png
step python -m experiments.efficiency
step python -m experiments.learning
step python -m experiments.video
step python -m experiments.live_compare --ckpts=runs/video/ca-s1/ckpt.pt,runs/video/insertion-s1/ckpt.pt --clip=0-39 --fps=20 --clip_prompts --one_stream --sink_tokens=4 --recent_tokens=64 --threads=1 --png=docs/live_compare.png
step python -m experiments.video --bounded=runs/video/ca-s1/ckpt.pt --sink_tokens=4 --recent_tokens=16,32,64,128,256,0
step python -m experiments.accuracy --tasks=shapes
step python -m experiments.adaptation
step python -m experiments.own_data
step python -m experiments.attention
step python stream.py --bench --json=runs/stream.json
step python -m experiments.efficiency --stream_json=runs/stream.json --png=docs/stream.png
echo "=== all done in $(( SECONDS / 60 )) min"
