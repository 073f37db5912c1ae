"""Shared helpers for the loader / train.py / sample.py tests: tiny datasets written into temp
folders with Pillow (no prepare scripts needed), and running the scripts as subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]  # the repo root (pytest.ini's pythonpath puts it on sys.path)

TINY_COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220)}
# a model small enough that a few steps take well under a second
TINY_MODEL = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--n_vis_layer=2", "--n_vis_head=2", "--n_vis_embd=32",
              "--image_size=16", "--patch_size=8", "--batch_size=4", "--warmup_iters=2", "--log_interval=1",
              "--eval_items=0", "--num_show=2", "--vision_pretrain_iters=0"]


def write_tiny_dataset(folder, n_train=18, n_val=6):
    """Two tasks: 'color' (one image, shorthand form, no marker) and 'pair' (two images, two turns)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = list(TINY_COLORS)
    for split, n in (("train", n_train), ("val", n_val)):
        lines = []
        for i in range(n):
            a, b = names[i % 3], names[(i // 3) % 3]
            for name in (a, b):
                path = folder / "images" / f"{name}.png"
                if not path.exists():
                    Image.new("RGB", (20, 20), TINY_COLORS[name]).save(path)
            if i % 3 == 2:
                lines.append({"images": [f"images/{a}.png", f"images/{b}.png"], "task": "pair",
                              "turns": [{"prompt": "<|image|>first?", "answer": a},
                                        {"prompt": "<|image|>second?", "answer": b}]})
            else:
                lines.append({"image": f"images/{a}.png", "prompt": "color?", "answer": a, "task": "color"})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def run(script, *args, check=True, timeout=300, module=False):
    """Run `python script args...` (a file: train.py), or with module=True `python -m script args...`
    (a module: data.video.prepare, experiments.token_scale), in the repo root, one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, *(["-m"] if module else []), script, *map(str, args)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def read_log(out_dir):
    with open(Path(out_dir) / "log.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
