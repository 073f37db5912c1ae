"""
How fast do the models learn to see? Accuracy against training time and steps, for each task and
for `ca`, `ca_tv`, `insertion` and the blind baseline (video: `ca`, `ca_all`, `insertion`), all with
train.py's recipe. Time to accuracy on the CPU is the number a user feels.

    python -m experiments.learning                        # shapes and video (about 2 h 20 min on 2 cores)
    python -m experiments.learning --tasks=text,charts    # the fine-grained tasks, seeds 2 and 3 (12 runs of about an hour on one thread)
    python -m experiments.learning --tasks=text           # text alone at seeds 1-3 (9 of the Table 2 text runs)
    python -m experiments.learning --tasks=shapes --models=ca,insertion

Every run is an ordinary train.py command (printed). Shapes runs are this script's own (1000 steps,
evaluated every 100 on 400 validation answers, runs/learning/shapes/<model>/); the other tasks' curves
are those of the Table 2 and Table 4 runs, the same commands (text and charts: python -m
experiments.accuracy --max_iters=10000, evaluated every 1000 steps; video: python -m experiments.video),
run here if they have not been yet. The table goes to docs/results/learning.md, the picture to docs/learning.png (--tasks=text,charts:
learning_fine.md and docs/learning_fine.png; --tasks=text: learning_text; a custom run writes under runs/results/ and
runs/learning.png instead). The picture draws accuracy against training seconds and against steps:
runs made on different days may differ in seconds per step, never in steps. With several seeds each
seed is a line of its model's colour: on text and charts one design's seeds differ more than the
designs do, so the fine-grained pair is drawn at two seeds (text alone at three), without the blind model (flat at the
answer prior, docs/results.md).
"""

import os
from types import SimpleNamespace

import configurator
from experiments import accuracy, plots, video
from experiments.runs import (AT_LEAST_1, ROOT, TASK_SETTINGS, check_settings, log_records, markdown_table,
                              model_settings, parse_names, parse_seeds, run_all, write_result)

FINE_ITERS = 10000  # text and charts: the budget of Table 2's fine-grained columns
# the published pictures: each pair of tasks drawn by default -> (file name, models, seeds)
PUBLISHED = {"shapes,video": ("learning", "ca,ca_tv,insertion,blind", "1"),
             "text,charts": ("learning_fine", "ca,ca_tv,insertion", "2,3"),
             "text": ("learning_text", "ca,ca_tv,insertion", "1,2,3")}

# -----------------------------------------------------------------------------
# text and charts need 10,000-step runs of every model (about an hour each on one thread): asked for by name
tasks = "shapes,video"
models = ""  # for shapes, text and charts (default: the pair's in PUBLISHED)
video_models = ",".join(video.VARIANTS)
max_iters = 1000
every = 100  # evaluate every this many steps
seeds = ""  # e.g. 1,2 (default: the pair's in PUBLISHED, else 1)
jobs = 2
threads = 1
# -----------------------------------------------------------------------------
DEFAULTS = configurator.settings(globals())


def curve(out_dir):
    """[(step, training seconds, accuracy, shuffled accuracy, {kind: accuracy})] of a finished run."""
    return [(r["step"], r["train_s"], r["accuracy"], r["shuffled_accuracy"], r["accuracy_by_kind"])
            for r in log_records(out_dir) if "accuracy" in r]


def learning_jobs(tasks, models, video_models, seeds, max_iters, every):
    """(jobs, where): the train.py runs behind every curve, and {(task, model, seed): run folder}.
    Shapes runs are this script's own; text, charts and video reuse the Table 2 and Table 4 runs (the
    same folders and settings as `python -m experiments.accuracy --max_iters=FINE_ITERS` and
    `python -m experiments.video`)."""
    jobs, where = [], {}  # where: (task, model, seed) -> its run's folder
    for task in tasks:
        for seed in seeds:
            if task == "video":
                for (out_dir, settings), model in zip(video.jobs_for(video_models, [seed]), video_models):
                    where[task, model, seed] = out_dir
                    jobs.append((out_dir, settings))
            elif task == "shapes":
                for model in models:
                    settings = dict(dataset=task, **TASK_SETTINGS[task], **model_settings(model), seed=seed,
                                    max_iters=max_iters, eval_interval=every, num_show=0)
                    # seed 1's folder keeps its old name, so that earlier runs are found
                    where[task, model, seed] = f"runs/learning/{task}/{model}" + (f"-s{seed}" if seed != 1 else "")
                    jobs.append((where[task, model, seed], settings))
            else:  # the Table 2 runs of the fine-grained tasks
                budget, root = accuracy.long_budget(FINE_ITERS)
                for (out_dir, settings), model in zip(accuracy.jobs_for([task], models, [seed], budget, root), models):
                    where[task, model, seed] = out_dir
                    jobs.append((out_dir, settings))
    return jobs, where


def main(argv=None):
    configurator.apply(globals(), argv)
    args = SimpleNamespace(**configurator.settings(globals()))
    name, default_models, default_seeds = PUBLISHED.get(args.tasks, ("learning", PUBLISHED["shapes,video"][1], "1"))
    # published: a pair of PUBLISHED with its own models and seeds, and every other setting at its default
    published = args.tasks in PUBLISHED and args.models in ("", default_models) and args.seeds in ("", default_seeds) \
        and all(getattr(args, k) == DEFAULTS[k] for k in ("video_models", "max_iters", "every"))
    check_settings(vars(args), max_iters=AT_LEAST_1, every=AT_LEAST_1, jobs=AT_LEAST_1, threads=AT_LEAST_1)
    tasks = parse_names(args.tasks, "tasks", TASK_SETTINGS)
    models = parse_names(args.models or default_models, "models", accuracy.MODELS)
    video_models = parse_names(args.video_models, "video_models", video.VARIANTS)
    seeds = parse_seeds(args.seeds or default_seeds)
    jobs, where = learning_jobs(tasks, models, video_models, seeds, args.max_iters, args.every)
    run_all(jobs, args.jobs, args.threads)

    curves = {key: curve(out_dir) for key, out_dir in where.items()}  # (task, model, seed) -> points
    models = list(dict.fromkeys(m for _, m, _ in where))  # every model drawn, in order
    rows = []
    for (task, model, seed), c in curves.items():
        for step, t, acc, shuffled, by_kind in c:
            rows.append([task, model, seed, step, f"{t:.0f}", f"{acc:.3f}", f"{shuffled:.3f}",
                         ", ".join(f"{k.split(': ', 1)[-1]} {a:.2f}" for k, a in by_kind.items())])
    text = (f"Accuracy along training (exact match on the first 400 validation answers; the last row of "
            f"each run on all of them), {args.threads} thread(s) per run, {args.jobs} runs "
            "at once; time is training seconds, evaluations left out; 'shuffled' is the accuracy with "
            "every image swapped for another of its batch.\n\n"
            + markdown_table(["task", "model", "seed", "step", "seconds", "accuracy", "shuffled", "by question"], rows))
    write_result(name, text, {f"{t}/{m}/s{s}": c for (t, m, s), c in curves.items()}, published=published)
    png = os.path.join(ROOT, f"docs/{name}.png" if published else f"runs/{name}.png")
    lines = {}  # (task, model) -> one curve per seed
    for (task, model, seed), c in curves.items():
        lines.setdefault((task, model), []).append(c)
    plots.accuracy_panels(lines, tasks, models, png)
    print(f"picture: {os.path.relpath(png, ROOT)}")


if __name__ == "__main__":
    main()
