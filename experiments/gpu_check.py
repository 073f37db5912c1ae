"""
The README's commands on one CUDA GPU, timed: train (torch.compile and bf16 autocast, which train.py
turns on by itself on CUDA), sample, the streaming benchmark and live captioning. Prints the card,
each command's wall time, and the training run's text tokens/s and MFU (train.py's, against the
matmul peak it measures at start-up), and writes them to out_dir/gpu_check.json.

    python -m experiments.gpu_check                          # on a machine with a CUDA GPU, ~5 min
    python -m experiments.gpu_check --quick=True --require_gpu=False   # the same steps, tiny, on a CPU

Each step is an ordinary command, printed before it runs, so any one can be rerun alone.
"""

import json
import os
import subprocess
import sys
import time

import torch

import configurator

# -----------------------------------------------------------------------------
out_dir = "runs/gpu_check"  # the run's checkpoint, logs and gpu_check.json
require_gpu = True  # stop with one line when there is no CUDA GPU (False: run on whatever device there is)
quick = False  # tiny budgets (50 steps, 20 stream turns): checks the steps run, times mean nothing
# -----------------------------------------------------------------------------


def timed(cmd, log_to):
    """Run cmd (a list) in the repo root, its output to the file log_to; (wall seconds, output)."""
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    with open(log_to, "w") as f:
        f.write(r.stdout + r.stderr)
    if r.returncode != 0:
        sys.exit(f"error: the step failed ({r.returncode}); its output is in {log_to}:\n{(r.stdout + r.stderr)[-2000:]}")
    return wall, r.stdout


def main(argv=None):
    configurator.apply(globals(), argv)
    if require_gpu and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here (torch.cuda.is_available() is False); run this on a machine with one, "
                 "or --require_gpu=False to run the same steps on this device")
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (cpu)"
    py, ckpt, run_dir = sys.executable, os.path.join(out_dir, "train", "ckpt.pt"), os.path.join(out_dir, "train")
    small = ["--max_iters=50", "--eval_interval=50"] if quick else []
    steps = {
        "train": [py, "train.py", f"--out_dir={run_dir}", *small],
        "sample": [py, "sample.py", f"--ckpt={ckpt}", "--num_samples=8"],
        "stream bench": [py, "stream.py", "--bench", f"--json={os.path.join(out_dir, 'stream.json')}",
                         *(["--turns=20"] if quick else [])],
        "live captioning": [py, "stream.py", f"--ckpt={ckpt}", "--clip=0-9", "--no_wait"],
    }
    if os.path.exists(os.path.join(run_dir, "ckpt.pt")):
        sys.exit(f"error: {run_dir} already holds a run; give another --out_dir (or remove it)")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:  # a file where the folder should be, no permission
        sys.exit(f"error: --out_dir={out_dir}: cannot make it: {e}")
    results = {"device": card, "quick": quick, "steps": {}}
    for name, cmd in steps.items():
        wall, _ = timed(cmd, os.path.join(out_dir, name.replace(" ", "_") + ".txt"))
        results["steps"][name] = {"command": " ".join(cmd[1:]), "wall_s": round(wall, 1)}
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()]
    speed = [r for r in log if "tok_per_s" in r][-10:]  # the last logged steps: past compilation and warm-up
    final = next(r for r in reversed(log) if r.get("final"))
    results["train"] = {"tok_per_s": round(sum(r["tok_per_s"] for r in speed) / len(speed)),
                        "mfu": round(sum(r["mfu"] for r in speed) / len(speed), 3),
                        "accuracy": final["accuracy"], "train_s": final["train_s"]}
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{card}")
    print("| step | command | wall |\n|---|---|---|")
    for name, s in results["steps"].items():
        print(f"| {name} | `python {s['command']}` | {s['wall_s']:.1f} s |")
    t = results["train"]
    print(f"train: {t['tok_per_s']:,} text tokens/s, MFU {100 * t['mfu']:.1f} % (of the matmul peak train.py measured), "
          f"accuracy {t['accuracy']:.4f}, {t['train_s']:.0f} s of training")


if __name__ == "__main__":
    main()
