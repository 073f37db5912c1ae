"""
How fast do the models learn to see? Accuracy against training time and steps, for each task and
for `ca`, `ca_tv`, `insertion` and the blind baseline, all with train.py's recipe. Time to accuracy
on the CPU is the number a user feels.

    python experiments/learning.py                        # shapes, 4 models, one seed
    python experiments/learning.py --tasks=shapes,charts --models=ca,insertion

Every run is an ordinary train.py command (printed), evaluated every --every steps on 400
validation answers (exact match, plus the image-shuffle check). Runs go to runs/learning/<task>/
<model>/; the table to docs/results/learning.md, the picture to docs/learning.png (a custom run
writes under runs/results/ and runs/learning.png instead).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import plots  # noqa: E402
from experiments.runs import ROOT, TASK_SETTINGS, is_default, markdown_table, run_all, write_result  # noqa: E402


def curve(out_dir):
    """[(step, training seconds, accuracy, shuffled accuracy, {kind: accuracy})] of a finished run."""
    with open(os.path.join(ROOT, out_dir, "log.jsonl")) as f:
        return [(r["step"], r["train_s"], r["accuracy"], r["shuffled_accuracy"], r["accuracy_by_kind"])
                for r in map(json.loads, f) if "accuracy" in r]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="shapes")
    parser.add_argument("--models", default="ca,ca_tv,insertion,blind")
    parser.add_argument("--max_iters", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100, help="evaluate every this many steps")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    tasks, models = args.tasks.split(","), args.models.split(",")
    unknown = [t for t in tasks if t not in TASK_SETTINGS]
    if unknown:
        sys.exit(f"error: unknown task {unknown[0]!r}; choose from {', '.join(TASK_SETTINGS)}")
    jobs = []
    for task in tasks:
        for model in models:
            settings = dict(dataset=task, **TASK_SETTINGS[task], variant="ca" if model == "blind" else model,
                            seed=args.seed, max_iters=args.max_iters, eval_interval=args.every, num_show=0)
            if model == "blind":
                settings["blind"] = True
            jobs.append((f"runs/learning/{task}/{model}", settings))
    run_all(jobs, args.jobs, args.threads)

    curves = {(t, m): curve(f"runs/learning/{t}/{m}") for t in tasks for m in models}
    rows = []
    for (task, model), c in curves.items():
        for step, t, acc, shuffled, by_kind in c:
            rows.append([task, model, step, f"{t:.0f}", f"{acc:.3f}", f"{shuffled:.3f}",
                         ", ".join(f"{k.split(': ', 1)[-1]} {a:.2f}" for k, a in by_kind.items())])
    published = is_default(parser, args)
    text = (f"Accuracy along training (exact match on the first 400 validation answers; the last row of "
            f"each run on all of them), seed {args.seed}, {args.threads} thread(s) per run, {args.jobs} runs "
            "at once; time is training seconds, evaluations left out; 'shuffled' is the accuracy with "
            "every image swapped for another of its batch.\n\n"
            + markdown_table(["task", "model", "step", "seconds", "accuracy", "shuffled", "by question"], rows))
    write_result("learning", text, {f"{t}/{m}": c for (t, m), c in curves.items()}, published=published)
    png = os.path.join(ROOT, "docs/learning.png" if published else "runs/learning.png")
    plots.accuracy_panels(curves, tasks, models, png)
    print(f"picture: {os.path.relpath(png, ROOT)}")


if __name__ == "__main__":
    main()
