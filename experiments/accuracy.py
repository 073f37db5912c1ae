"""
The paper's Table 2 at toy scale: every fusion variant, and the blind baseline, trained with the
same budget on the coarse task (shapes) and the two fine-grained ones (text reading, charts),
several seeds each. Reports greedy exact-match accuracy and the validation loss on answer tokens
(the loss still moves when a hard task's exact-match accuracy is near zero).

    python -m experiments.accuracy                        # 3 tasks x 7 models x 3 seeds (63 runs of 4-7 min on one thread)
    python -m experiments.accuracy --tasks=shapes --seeds=1   # one column, one seed
    python -m experiments.accuracy --tasks=text,charts --seeds=1 --max_iters=5000
                                                          # the fine-grained columns: a longer budget, with
                                                          # learning curves (14 runs of ~35 min on one thread)
    python -m experiments.accuracy --tasks=text --max_iters=10000 --patch_size=16
                                                          # every model with 16 px patches instead of the
                                                          # task's own (text's is 8: 64 tokens of a 64 px
                                                          # image); runs go to runs/accuracy-10000-p16

Runs go to runs/accuracy/<task>/<variant>-s<seed>/ (log.jsonl, ckpt.pt, train.txt); a run that
already finished is not run again, and one that was interrupted goes on from its last checkpoint, so
an interrupted sweep continues where it stopped. The table is printed and written to
docs/results/accuracy.md.
"""

import json
import os
import re
from types import SimpleNamespace

import casa
import configurator
from experiments.runs import (AT_LEAST_1, ROOT, TASK_SETTINGS, check_settings, is_default, markdown_table,
                              mean_spread, model_settings, parse_names, parse_seeds, predictions, run_all, write_result)

# one budget for every run (train.py's recipe otherwise): 4-7 min each on one CPU thread (text's, with 8 px patches, the longest)
BUDGET = dict(max_iters=1000, batch_size=32, eval_interval=1000, num_show=0)
CHANCE = {"shapes": "~0.13", "text": "~0", "charts": "~0.15"}

# -----------------------------------------------------------------------------
tasks = "shapes,text,charts"
# ca_all differs from ca only when a sample has several images: on these one-image tasks it is the
# same model, step for step (same parameters, same seed), so it is left out (see experiments/video.py)
models = ",".join([*(v for v in casa.VARIANTS if v != "ca_all"), "blind"])
seeds = "1,2,3"
max_iters = BUDGET["max_iters"]  # another budget: runs go to runs/accuracy-N, evaluated every N/10 steps
# patch size for every task and model (0: each task's own); unless it is every task's own, runs go to <runs folder>-pN
patch_size = 0
jobs = 2  # runs at once (each on --threads threads)
threads = 1
# -----------------------------------------------------------------------------
DEFAULTS = configurator.settings(globals())  # only a run with these publishes its table (runs.is_default)
MODELS = [*casa.VARIANTS, "blind"]  # what --models may name
PATCH_SIZE = (lambda p: p == 0 or (p >= 2 and p & (p - 1) == 0), "0 (each task's own) or a power of 2 (2, 4, 8, 16)")


def long_budget(max_iters):
    """Another budget than BUDGET (--max_iters): (settings, runs folder); evaluated ten times along
    the way, so learning.py draws its curves from the same runs."""
    return dict(BUDGET, max_iters=max_iters, eval_interval=max(1, max_iters // 10)), f"runs/accuracy-{max_iters}"


def jobs_for(tasks, models, seeds, budget=BUDGET, root="runs/accuracy", patch_size=None):
    """(out_dir, train.py settings) for every task x model x seed; model 'blind' is ca with blank images.
    patch_size, if given, replaces every task's own (TASK_SETTINGS) for every model alike."""
    jobs = []
    for task in tasks:
        image = dict(TASK_SETTINGS.get(task, {}))
        if patch_size:
            image["patch_size"] = patch_size
        for model in models:
            for seed in seeds:
                settings = dict(dataset=task, **image, **model_settings(model), seed=seed, **budget)
                jobs.append((f"{root}/{task}/{model}-s{seed}", settings))
    return jobs


def with_patch_size(tasks, patch_size, root, name):
    """--patch_size N: (N, root-pN, name_pN), the runs kept apart from those of each task's own patch
    size; (0, root, name) when N is 0 or already every task's own, so that it changes nothing."""
    if not patch_size or all(TASK_SETTINGS.get(t, {}).get("patch_size") == patch_size for t in tasks):
        return 0, root, name
    return patch_size, f"{root}-p{patch_size}", f"{name}_p{patch_size}"


def curve(out_dir):
    """[(step, accuracy, {question kind: accuracy})] of a run's periodic and final evaluations."""
    with open(os.path.join(ROOT, out_dir, "log.jsonl")) as f:
        return [(r["step"], r["accuracy"], r.get("accuracy_by_kind", {})) for r in map(json.loads, f) if "accuracy" in r]


def kind_curve_rows(root, tasks, models, seeds):
    """Rows of each question kind's accuracy at every evaluation: one row per seed and, with several
    seeds, their mean ± std (a question learned at different steps by different seeds shows here)."""
    rows = []
    for task in tasks:
        for model in models:
            curves = {s: curve(f"{root}/{task}/{model}-s{s}") for s in seeds}
            for kind in curves[seeds[0]][-1][2]:
                per_seed = {s: [by_kind[kind] for _, _, by_kind in c] for s, c in curves.items()}
                name = kind.split(": ", 1)[-1]
                rows += [[task, model, s, name] + [f"{a:.3f}" for a in accs] for s, accs in per_seed.items()]
                if len(seeds) > 1:
                    rows.append([task, model, "mean", name] + [mean_spread(list(col)) for col in zip(*per_seed.values())])
    return rows


def by_question(ckpt_path):
    """{question: (accuracy, count, share of the most common true answer)} of a checkpoint on its
    validation split, questions grouped by prompt with single letters ("bar c") blanked."""
    right, truths = {}, {}
    for it, pred in predictions(ckpt_path):
        q = re.sub(r"\b[a-z]\b", "_", it["prompt"].replace(casa.IMAGE, "").strip())
        right.setdefault(q, []).append(pred.strip() == it["truth"].strip())
        truths.setdefault(q, []).append(it["truth"])
    return {q: (sum(r) / len(r), len(r), max(map(truths[q].count, set(truths[q]))) / len(r))
            for q, r in sorted(right.items())}


def main(argv=None):
    configurator.apply(globals(), argv)
    args = SimpleNamespace(**configurator.settings(globals()))
    check_settings(vars(args), max_iters=AT_LEAST_1, patch_size=PATCH_SIZE, jobs=AT_LEAST_1, threads=AT_LEAST_1)
    tasks, models = parse_names(args.tasks, "tasks"), parse_names(args.models, "models", MODELS)
    seeds = parse_seeds(args.seeds)
    budget, root, name = BUDGET, "runs/accuracy", "accuracy"
    if args.max_iters != BUDGET["max_iters"]:
        (budget, root), name = long_budget(args.max_iters), f"accuracy_{args.max_iters}"
    args.patch_size, root, name = with_patch_size(tasks, args.patch_size, root, name)

    results = run_all(jobs_for(tasks, models, seeds, budget, root, args.patch_size), args.jobs, args.threads)
    header = (["model"] + [f"{t} accuracy" for t in tasks] + [f"{t} shuffled" for t in tasks]
              + [f"{t} val loss" for t in tasks])
    rows, data = [], {}
    for model in models:
        row = [model]
        for key in ("accuracy", "shuffled_accuracy", "val_loss"):
            for task in tasks:
                xs = [results[f"{root}/{task}/{model}-s{s}"][key] for s in seeds]
                data.setdefault(model, {}).setdefault(task, {})[key] = xs
                row.append(mean_spread(xs))
        rows.append(row)
    rows.append(["chance"] + [CHANCE.get(t, "") for t in tasks] + [""] * 2 * len(tasks))
    # per question kind (colour, shape, caption...), mean over seeds
    kinds_rows = []
    for task in tasks:
        for model in models:
            recs = [results[f"{root}/{task}/{model}-s{s}"] for s in seeds]
            for kind in recs[0].get("accuracy_by_kind", {}):
                xs = [r["accuracy_by_kind"][kind] for r in recs]
                data[model][task].setdefault("by_kind", {})[kind] = xs
                kinds_rows.append([task, model, kind.split(": ", 1)[-1], mean_spread(xs)])
    settings = ", ".join(f"{k}={v}" for k, v in budget.items() if k not in ("eval_interval", "num_show"))
    wall = sum(r["wall_s"] for r in results.values() if "wall_s" in r)
    over = f"mean ± std over seeds {args.seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    text = (f"Accuracy (greedy exact match on all validation answers) and validation loss (answer tokens), "
            f"{over}; {settings}; train.py defaults otherwise "
            f"(4 layers x 128; image and patch size per task from experiments/runs.py's TASK_SETTINGS"
            f"{f', patch size {args.patch_size} for every task' if args.patch_size else ''}). {len(results)} runs, {wall / 60:.0f} min of "
            f"run time in total. 'shuffled': accuracy with every image swapped for another of its batch "
            f"(the image-use check).\n\n" + markdown_table(header, rows)
            + "\n\nBy question kind:\n\n" + markdown_table(["task", "model", "question", "accuracy"], kinds_rows))
    if budget is not BUDGET:  # the learning curves: accuracy at each evaluation, mean over seeds
        steps = [st for st, _, _ in curve(f"{root}/{tasks[0]}/{models[0]}-s{seeds[0]}")]
        curve_rows = []
        for task in tasks:
            for model in models:
                accs = [[a for _, a, _ in curve(f"{root}/{task}/{model}-s{s}")] for s in seeds]
                curve_rows.append([task, model] + [f"{sum(col) / len(col):.3f}" for col in zip(*accs)])
                data[model][task]["curve"] = accs
        text += ("\n\nAccuracy along the way (periodic evaluations on the first 400 validation answers, the "
                 f"last one on all){', mean over seeds' if len(seeds) > 1 else ''}:\n\n"
                 + markdown_table(["task", "model"] + [f"step {st}" for st in steps], curve_rows)
                 + "\n\nEach question kind along the way:\n\n"
                 + markdown_table(["task", "model", "seed", "question"] + [f"step {st}" for st in steps],
                                  kind_curve_rows(root, tasks, models, seeds)))
        # per question, seed 1's final models, against always giving the most common true answer
        q_rows = []
        for task in tasks:
            for model in models:
                for q, (acc, n, majority) in by_question(os.path.join(ROOT, f"{root}/{task}/{model}-s{seeds[0]}/ckpt.pt")).items():
                    q_rows.append([task, model, q, n, f"{acc:.3f}", f"{majority:.3f}"])
        text += (f"\n\nBy question (seed {seeds[0]}'s final models; single letters in the prompt shown as _):\n\n"
                 + markdown_table(["task", "model", "question", "answers", "accuracy", "most common answer's share"], q_rows))
    write_result(name, text, data, published=is_default(vars(args), DEFAULTS))


if __name__ == "__main__":
    main()
