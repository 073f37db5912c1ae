"""
Your own data: what train.py's defaults do with a folder they were not tuned on. Every model is
trained with the README's own-data command and nothing else (`python train.py --dataset=FOLDER
--variant=V`: image size, budget and stages follow the folder), evaluated along the way, and
reported by question kind, with the blind baseline (images blanked) beside it: a model that
reads only the answer prior sits at the blind line.

    python -m experiments.own_data                                 # data/scenes: ca, insertion, blind
    python -m experiments.own_data --datasets=path/to/folder       # any folder in data/README.md's format
    python -m experiments.own_data --models=ca --seeds=1,2,3

Runs go to runs/own_data/<dataset>/<model>-s<seed>/ (skipped when finished, resumed when
interrupted); the published table's runs keep a copy of their log in docs/runs/own_data/. The
table goes to docs/results/own_data.md, the learning curves by question kind to docs/own_data.png
(for other settings: runs/results/ and runs/results/own_data.png).
"""

import os
from types import SimpleNamespace

import configurator
from experiments.accuracy import MODELS
from experiments.plots import grid_of, line_panels
from experiments.runs import (AT_LEAST_1, ROOT, check_settings, is_default, log_records, markdown_table,
                              mean_spread, model_settings, parse_names, parse_seeds, run_all, write_result)

# the scenes set's question kinds by their first two words; other folders keep train.py's kind names
SCENES_KINDS = {"is there": "existence", "what color": "colour", "what shape": "shape", "how many": "count",
                "is the": "relation"}
EVAL_INTERVAL = 250  # evaluations along the way (they do not change what is trained)

# -----------------------------------------------------------------------------
datasets = "scenes"  # comma list of built-in names or folders
models = "ca,insertion,blind"
seeds = "1"
jobs = 2  # runs at once (each on --threads threads)
threads = 1
# -----------------------------------------------------------------------------
DEFAULTS = configurator.settings(globals())  # only a run with these publishes its table (runs.is_default)


def kind_name(kind):
    short = kind.split(": ", 1)[-1]
    return SCENES_KINDS.get(short, short)


def short_name(dataset):
    return os.path.basename(os.path.normpath(dataset))


def evaluations(out_dir):
    """The periodic and final evaluations of a run's log.jsonl, in order, and its vision-stage seconds."""
    return [r for r in log_records(out_dir) if "accuracy" in r]


def jobs_for(datasets, models, seeds):
    return [(f"runs/own_data/{short_name(d)}/{m}-s{s}",
             dict(dataset=d, **model_settings(m), seed=s, eval_interval=EVAL_INTERVAL, num_show=0))
            for d in datasets for m in models for s in seeds]


def main(argv=None):
    configurator.apply(globals(), argv)
    args = SimpleNamespace(**configurator.settings(globals()))
    check_settings(vars(args), jobs=AT_LEAST_1, threads=AT_LEAST_1)
    datasets, models = parse_names(args.datasets, "datasets"), parse_names(args.models, "models", MODELS)
    seeds = parse_seeds(args.seeds)

    jobs = jobs_for(datasets, models, seeds)
    # the published table's runs keep their logs in docs/runs/ (runs.run_all)
    published_jobs = jobs_for(DEFAULTS["datasets"].split(","), DEFAULTS["models"].split(","), parse_seeds(DEFAULTS["seeds"]))
    results = run_all(jobs, args.jobs, args.threads, keep_logs={d for d, s in jobs if (d, s) in published_jobs})

    rows, curve_rows, points, data = [], [], [], {}
    for d in datasets:
        name = short_name(d)
        for m in models:
            runs = [f"runs/own_data/{name}/{m}-s{s}" for s in seeds]
            finals = [results[r] for r in runs]
            kinds = list(finals[0].get("accuracy_by_kind", {}))
            minutes = [f["train_s"] / 60 for f in finals]
            data.setdefault(name, {})[m] = dict(
                accuracy=[f["accuracy"] for f in finals], shuffled=[f["shuffled_accuracy"] for f in finals],
                by_kind={kind_name(k): [f["accuracy_by_kind"][k] for f in finals] for k in kinds},
                steps=[f["step"] for f in finals], train_min=minutes)
            rows.append([name, m, mean_spread([f["accuracy"] for f in finals])]
                        + [mean_spread([f["accuracy_by_kind"][k] for f in finals]) for k in kinds]
                        + [mean_spread([f["shuffled_accuracy"] for f in finals]), finals[0]["step"],
                           f"{sum(minutes) / len(minutes):.0f}"])
            header_kinds = [kind_name(k) for k in kinds]
            for s, r in zip(seeds, runs):
                evals = evaluations(r)
                curve_rows.append([name, m, s] + [f"{e['accuracy']:.3f}" for e in evals])
                for e in evals if d == datasets[0] else []:  # the picture: the first dataset's
                    point = {"step": e["step"], "model": m if len(seeds) == 1 else f"{m} s{s}", "all": e["accuracy"]}
                    point.update({kind_name(k): a for k, a in e.get("accuracy_by_kind", {}).items()})
                    points.append(point)
                data[name][m].setdefault("curves", []).append(
                    [(e["step"], e["accuracy"], {kind_name(k): a for k, a in e.get("accuracy_by_kind", {}).items()})
                     for e in evals])
    steps = [e["step"] for e in evaluations(jobs[0][0])]
    over = f"mean ± std over seeds {args.seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    commands = "; ".join(f"`python train.py --dataset={d}{' --variant=' + m if m != 'blind' else ' --blind=True'}`"
                         for d in datasets for m in models)
    text = (f"Own data: train.py's defaults, nothing else ({commands}; evaluated every {EVAL_INTERVAL} steps "
            f"on the first 400 validation answers, at the end on all), {over}. Accuracy is greedy exact match; "
            f"'shuffled' swaps every image for another of its batch (a model that reads its images loses "
            f"accuracy); 'train min' is training time on this machine, the vision stage included, "
            f"evaluations left out, each run on one thread beside another.\n\n"
            + markdown_table(["dataset", "model", "all"] + header_kinds + ["shuffled", "steps", "train min"], rows)
            + "\n\nAccuracy along the way:\n\n"
            + markdown_table(["dataset", "model", "seed"] + [f"step {st}" for st in steps], curve_rows))
    published = is_default(vars(args), DEFAULTS)
    write_result("own_data", text, data, published=published)
    picture = os.path.join(ROOT, "docs" if published else "runs/results", "own_data.png")
    panels = [("all", "all questions", 1)] + [(k, k, 1) for k in header_kinds]
    title = f"{short_name(datasets[0])}: accuracy by question kind along training"
    rows_of_panels = [line_panels(points, None, panels[i:i + 3], title=title if i == 0 else "", x_key="step",
                                  x_label="step", line_key="model", y_top=1) for i in range(0, len(panels), 3)]
    grid_of(rows_of_panels, 1).save(picture)
    print(f"(picture: {os.path.relpath(picture, ROOT)})")

if __name__ == "__main__":
    main()
