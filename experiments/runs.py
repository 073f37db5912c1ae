"""
What the experiment scripts share: run train.py as separate processes (a few at once, each on its
own CPU threads), skip runs that already finished, resume interrupted ones, read their final metrics,
and print tables.

Every run is an ordinary `python train.py --k=v ...` command; run_all prints each one, so any row
of any table can be rerun by hand.
"""

import json
import os
import statistics
import subprocess
import sys
import time

import torch

import casa
from data.loader import Dataset, answer, eval_batches, resolve_dataset
from stream import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# per task, the train.py settings that differ from its defaults, the same for every model of a table.
# The tables were trained before train.py's defaults followed the data (docs/recipe.md, "own data"):
# RECIPE_2025 keeps them reproducible as published (GPT-2's init std, plain sampling, no vision stage
# unless a task asks, no stem norm, position embeddings from zero, AdamW alone, one question a picture
# drawn, images not moved; each table sets its max_iters).
# charts and text need 64 px images (a chart's grid step is 5 px there, 2.5 px at 32); text 8 px
# patches, 64 tokens an image (with 16 px ones a token holds parts of two digits, and a third of the
# runs missed digits read as similar ones: docs/recipe.md)
RECIPE_2025 = dict(init_std=0.02, balance_kinds=False, vision_pretrain_iters=0, stem_norm=False, pos_std=0.0,
                   optimizer="adamw", questions_per_image=1, augment_shift=0)
TASK_SETTINGS = {
    "shapes": dict(RECIPE_2025, image_size=32, patch_size=8),
    "text": dict(RECIPE_2025, image_size=64, patch_size=8),
    "charts": dict(RECIPE_2025, image_size=64, patch_size=16),
    # clips of 6-10 frames, 8 a batch; 64 px (an object is 16 px across, one token); the encoder
    # pretrained for 800 steps first (train.py's stage 1: the commentary alone teaches it slowly)
    "video": dict(RECIPE_2025, image_size=64, patch_size=16, batch_size=8, vision_pretrain_iters=800),
}


def train_command(out_dir, settings):
    """The exact train.py command line of one run."""
    return ["python", "train.py", *(f"--{k}={v}" for k, v in settings.items()), f"--out_dir={out_dir}"]


# runs/ is not committed, and a table of three seeds is often trained over several days and machines.
# So the runs behind a published table keep a copy of their log in the repo, docs/runs/<the folder
# below runs/>.jsonl (its first line the run's settings): a table can be written again, and the runs
# still missing trained, on a fresh clone. Delete a copy (and the run's folder) to train that run again.
RUNS, KEPT_LOGS = os.path.join(ROOT, "runs"), os.path.join(ROOT, "docs", "runs")


def kept_log_path(out_dir):
    """docs/runs/<task>/<model>-s1.jsonl for runs/<task>/<model>-s1 (None for a folder outside runs/)."""
    below = os.path.relpath(os.path.join(ROOT, out_dir), RUNS)
    return None if below.startswith("..") else os.path.join(KEPT_LOGS, below + ".jsonl")


def log_records(out_dir):
    """The records of a run's log.jsonl, from its folder, or from the copy kept in docs/runs/ when the
    folder has no log (a fresh clone); [] when there is neither."""
    for path in (os.path.join(ROOT, out_dir, "log.jsonl"), kept_log_path(out_dir)):
        if path and os.path.exists(path):
            with open(path) as f:
                try:
                    return [r for r in (json.loads(line) for line in f if line.strip()) if "settings" not in r]
                except json.JSONDecodeError as e:  # a log cut short or edited by hand
                    sys.exit(f"error: {os.path.relpath(path, ROOT)} is not a run log ({e}): delete it to train that run again")
    return []


def keep_log(out_dir, settings):
    """Copy a finished run's log into docs/runs/, its settings first (written whole or not at all): its
    evaluations and stage lines, not the training loss logged every few steps (that stays in the run's
    folder), so a copy is a few kB."""
    path = kept_log_path(out_dir)
    if path is None:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(os.path.join(ROOT, out_dir, "log.jsonl")) as f:
        lines = [line for line in f if line.strip() and "loss" not in json.loads(line)]
    with open(path + ".tmp", "w") as f:
        f.write(json.dumps({"settings": settings}) + "\n" + "".join(lines))
    os.replace(path + ".tmp", path)


def final_record(out_dir):
    """The "final" line of a finished run's log (log_records), or None if the run has not finished."""
    finals = [r for r in log_records(out_dir) if r.get("final")]
    return finals[-1] if finals else None


def settings_clash(out_dir, settings):
    """The settings a finished run was trained with (its checkpoint's train_args) that differ from
    what this job asks for, as 'patch_size=16 (this job asks for 8)'; [] when they agree or there is
    no checkpoint to read. Catches a folder filled before a table's settings changed (TASK_SETTINGS,
    a budget), which would otherwise be skipped as done and reported under the new settings."""
    path = os.path.join(ROOT, out_dir, "ckpt.pt")
    if os.path.exists(path):
        try:
            saved = casa.load_checkpoint(path)[1].get("train_args", {})
        except (OSError, ValueError, RuntimeError) as e:  # not a checkpoint, or weights that do not fit
            sys.exit(f"error: cannot read the finished run's checkpoint to check its settings: {e}")
    elif not os.path.exists(os.path.join(ROOT, out_dir, "log.jsonl")) and os.path.exists(kept_log_path(out_dir) or ""):
        with open(kept_log_path(out_dir)) as f:  # the copy in docs/runs/: its first line
            saved = json.loads(f.readline()).get("settings", {})
    else:
        return []

    def same(was, asked):  # asked may be a string from a command line: 3e-4 is 0.0003
        if was == asked or str(was) == str(asked):
            return True
        try:
            return not isinstance(was, bool) and isinstance(was, (int, float)) and type(was)(asked) == was
        except ValueError:
            return False

    return [f"{k}={saved[k]!r} (this job asks for {v!r})" for k, v in settings.items()
            if k in saved and not same(saved[k], v)]


def run_all(jobs, parallel=2, threads=1, keep_logs=()):
    """Run every (out_dir, settings) job that has not finished yet, `parallel` at a time, each with
    `threads` CPU threads; one that was interrupted goes on from its last checkpoint (train.py
    --resume=True, its output appended to train.txt). Returns {out_dir: final record} for all jobs.
    A failed run stops everything with its log's last lines, and so does a finished one whose
    checkpoint (or kept log) says it was trained with other settings than its job's (settings_clash).
    The runs in keep_logs (out_dirs: those behind a published table) keep a copy of their log in
    docs/runs/ once finished, and count as finished where only that copy is left."""
    todo = [(d, s) for d, s in jobs if final_record(d) is None]
    for out_dir, settings in jobs:
        clash = settings_clash(out_dir, settings) if final_record(out_dir) else []
        if clash:
            sys.exit(f"error: {out_dir} holds a finished run trained with {', '.join(clash)}. Its numbers "
                     "would be reported as this job's: move or delete that folder to train it again with "
                     "these settings (or keep it and ask for the settings it was made with)")
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already done, {len(todo)} to run "
          f"({parallel} at a time, {threads} thread(s) each)", flush=True)
    for out_dir, settings in jobs:  # finished before logs were kept, or in a folder of its own
        if out_dir in keep_logs and final_record(out_dir) and os.path.exists(os.path.join(ROOT, out_dir, "log.jsonl")):
            keep_log(out_dir, settings)
    # a built-in dataset missing on a fresh clone is prepared here, once, before runs start in parallel
    names = [s.get("dataset", "shapes") for _, s in todo]  # train.py's default dataset is shapes
    for name in dict.fromkeys(n for n in names if "/" not in n):  # built-in names, each once
        try:
            resolve_dataset(name)
        except (OSError, ValueError) as e:  # an unknown name, a prepare script that failed
            sys.exit(f"error: {e}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    running, done, t_start = [], 0, time.time()
    while todo or running:
        while todo and len(running) < parallel:
            out_dir, settings = todo.pop(0)
            os.makedirs(os.path.join(ROOT, out_dir), exist_ok=True)
            # an interrupted run (a checkpoint, no final line) goes on from its last checkpoint
            interrupted = os.path.exists(os.path.join(ROOT, out_dir, "ckpt.pt"))
            cmd = train_command(out_dir, dict(settings, resume=True) if interrupted else settings)
            print("  $ " + " ".join(cmd), flush=True)
            out = open(os.path.join(ROOT, out_dir, "train.txt"), "a" if interrupted else "w")
            proc = subprocess.Popen([sys.executable, *cmd[1:]], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            running.append((proc, out, out_dir, settings, time.time()))
        time.sleep(0.2)
        for item in list(running):
            proc, out, out_dir, settings, t0 = item
            if proc.poll() is None:
                continue
            out.close()
            running.remove(item)
            record = final_record(out_dir)
            if proc.returncode != 0 or record is None:
                for p, o, *_ in running:
                    p.kill()
                    o.close()
                with open(os.path.join(ROOT, out_dir, "train.txt")) as f:
                    tail = f.read()[-2000:]
                sys.exit(f"run {out_dir} failed (exit {proc.returncode}):\n{tail}")
            done += 1
            if out_dir in keep_logs:
                keep_log(out_dir, settings)
            print(f"  done {out_dir}: accuracy {record['accuracy']:.3f}, val_loss {record['val_loss']:.4f} "
                  f"({time.time() - t0:.0f} s; {done} finished, {time.time() - t_start:.0f} s so far)", flush=True)
    return {d: final_record(d) for d, _ in jobs}


# -----------------------------------------------------------------------------
# Settings: each script checks its own when it reads them; a bad one ends it with one line


AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
AT_LEAST_0 = (lambda v: v >= 0, "0 or more")


def check_settings(settings, **rules):
    """settings: {name: value} of a script; rules: name=(test, what it takes), e.g. jobs=AT_LEAST_1.
    The first setting that fails its test ends the script with one line naming it and its value."""
    for name, (test, takes) in rules.items():
        if not test(settings[name]):
            sys.exit(f"error: --{name} must be {takes}, got {settings[name]!r}")


def parse_seeds(text):
    """'1,2,3' -> [1, 2, 3]; anything else (not whole numbers, negative, repeated) ends the script
    with one line that says what to give."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        sys.exit(f"error: --seeds={text!r} is not a comma-separated list of whole numbers; give e.g. --seeds=1,2,3")
    if min(seeds) < 0 or len(set(seeds)) < len(seeds):
        sys.exit(f"error: --seeds={text!r}: each seed once, 0 or more; give e.g. --seeds=1,2,3")
    return seeds


def parse_names(text, setting, choices=None):
    """'a,b' -> ['a', 'b'], a comma-list setting (--models, --tasks); an empty or repeated name, or
    with `choices` one not among them, ends the script with one line."""
    names = [n.strip() for n in text.split(",")]
    if not all(names) or len(set(names)) < len(names):
        sys.exit(f"error: --{setting}={text!r}: give a comma list of names, each once")
    unknown = [n for n in names if choices is not None and n not in choices]
    if unknown:
        sys.exit(f"error: --{setting}: unknown {unknown[0]!r}; choose from {', '.join(choices)}")
    return names


def check_picture(setting, path, root=""):
    """A picture setting (--png, --out), before any work: a file name Pillow can write (by its
    extension), its folder made now (under root, for a path relative to the repo)."""
    from PIL import Image

    full = os.path.join(root, path)
    if os.path.splitext(path)[1].lower() not in Image.registered_extensions() or os.path.isdir(full):
        sys.exit(f"error: --{setting}={path} is not a picture file name: give one like {setting}.png")
    try:
        os.makedirs(os.path.dirname(full) or ".", exist_ok=True)
    except OSError as e:  # a file where a folder should be, no permission
        sys.exit(f"error: --{setting}={path}: cannot make its folder: {e}")


def model_settings(model):
    """The train.py settings that make a table's model: a variant, or 'blind' (ca with blank images)."""
    return dict(variant="ca", blind=True) if model == "blind" else dict(variant=model)


def validation_split(ckpt_path):
    """(model, its validation Dataset) of a checkpoint: blank images if it was trained blind. A missing
    or broken checkpoint, or its dataset gone, raises OSError or ValueError (one line)."""
    model, ckpt = load_model(ckpt_path, "cpu")
    blind = ckpt.get("train_args", {}).get("blind", False)
    return model, Dataset(ckpt.get("dataset_dir", ""), "val", model.config.image_size, blind=blind)


@torch.no_grad()
def predictions(ckpt_path, keep=lambda item, data: True):
    """Greedy answers of a checkpoint on its validation split (blank images if it was trained blind):
    [(eval item, answer string)] for the items `keep(item, data)` selects, in eval_batches' order."""
    model, data = validation_split(ckpt_path)
    items = [it for it in data.eval_items() if keep(it, data)]
    out = []
    for idx, images, chunk in eval_batches(items, 128):
        out += zip(chunk, answer(model, idx, images, data.tokenizer, data.max_answer_len() + 4))
    return out


def mean_spread(xs, digits=3):
    """'mean ± sample std' of a list of numbers (just the number when there is one)."""
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def is_default(settings, defaults):
    """True when every setting (a script's, after its command line) has its default value, whether
    the command line spelled it out or not: only then does a script's table replace the published one
    in docs/results/. --jobs and --threads say how the runs share the machine, not what they compute,
    so they may differ."""
    return all(settings[k] == v for k, v in defaults.items() if k not in ("jobs", "threads"))


def write_result(name, text, data=None, published=True):
    """Print a result table and keep it (markdown, plus the raw numbers as JSON): under docs/results/
    for the default run of a script (the README's tables), under runs/results/ for any other
    settings, so that a partial or custom rerun never overwrites the published numbers."""
    print("\n" + text)
    where = "docs/results" if published else "runs/results"
    folder = os.path.join(ROOT, where)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    if data is not None:
        with open(os.path.join(folder, f"{name}.json"), "w") as f:
            json.dump(data, f, indent=1)
    print(f"\n(written to {where}/{name}.md)")
