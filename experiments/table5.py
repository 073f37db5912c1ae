"""
The paper's Table 5 at toy scale: how many fusion layers (5a) and how many image tokens (5b).

    5a  CASA (`ca_tv`) with its CA layers in every n-th block, n = 1, 2, 4, on an 8-layer model (so
        n = 4 keeps two CA layers, in blocks 0 and 4; the other blocks are plain SA blocks)
    5b  insertion with the N image tokens of each image compressed to Q = N, N/4, N/16 by Q learned
        queries (casa.QueryCompressor, a Q-Former-style block; Q = N is plain insertion)

on a fine-grained task (charts) and the coarse one (shapes), the blind baseline beside them, on the
same 8-layer backbone and the same budget per task, with train.py's recipe (each task's image and
patch size from experiments/runs.py; shapes with the recipe its published seeds were run with, see
jobs_for). Reported: accuracy by question kind (mean ±
std over seeds), the training cost (text tokens/s and activation memory of a few AdamW steps,
experiments/efficiency.py's train_speed) and the streaming cost (KV bytes a turn adds and FLOPs per
text token, from casa's formulas; python -m experiments.stream_policies measures them in a stream).

    python -m experiments.table5                                  # charts and shapes, 7 models, 3 seeds
    python -m experiments.table5 --tasks=shapes                   # the coarse column: 21 runs of 8-13 min
    python -m experiments.table5 --tasks=charts --seeds=1 "--models=ca_tv n=1" --charts_iters=300   # a probe
    python -m experiments.table5 --tasks=text                     # text reading too, if CPU time allows

Runs go to runs/table5/<task>/<model>-s<seed>/ (finished runs skipped, interrupted ones resumed);
the table and the learning curves to docs/results/table5.md and docs/table5.png (runs/results/ and
runs/table5.png for other settings). The published table's runs keep a copy of their log in
docs/runs/table5/ (runs/ is not committed), so the table's 42 runs can be trained over several days:
on a fresh clone those count as finished (delete a copy to train that run again).
"""

import os
from types import SimpleNamespace

import torch

import casa
import configurator
from data.loader import Dataset, resolve_dataset
from experiments import plots
from experiments.efficiency import train_speed
from experiments.learning import curve
from experiments.runs import (AT_LEAST_1, ROOT, TASK_SETTINGS, check_settings, is_default, markdown_table,
                              mean_spread, parse_names, parse_seeds, run_all, write_result)

# the models: train.py settings on top of the task's own (image and patch size) and the depth
MODELS = {
    "ca_tv n=1": dict(variant="ca_tv", ca_every=1),
    "ca_tv n=2": dict(variant="ca_tv", ca_every=2),
    "ca_tv n=4": dict(variant="ca_tv", ca_every=4),
    "insertion Q=N": dict(variant="insertion"),
    "insertion Q=N/4": dict(variant="insertion", compress_queries=4),  # divisor of N; set per task below
    "insertion Q=N/16": dict(variant="insertion", compress_queries=16),
    "blind": dict(variant="ca", blind=True),
}

# each model's line in the learning curves: CASA purple, paler with fewer CA layers; insertion red,
# paler with fewer tokens
COLORS = {"ca_tv n=1": (148, 103, 189), "ca_tv n=2": (190, 160, 220), "ca_tv n=4": (225, 210, 240),
          "insertion Q=N": (214, 39, 40), "insertion Q=N/4": (240, 130, 120), "insertion Q=N/16": (250, 195, 185),
          "blind": (127, 127, 127)}

# -----------------------------------------------------------------------------
tasks = "charts,shapes"
models = ",".join(MODELS)
seeds = "1,2,3"
n_layer = 8  # deep enough for n = 4 to keep two CA layers
charts_iters = 1500  # where the first seed's curves had separated (the published Table 2 ran 10000: docs/results.md)
text_iters = 10000
shapes_iters = 500  # the coarse table's (its published seeds)
jobs = 2
threads = 1
# -----------------------------------------------------------------------------
DEFAULTS = configurator.settings(globals())


def folder_name(model):
    return model.replace(" ", "-").replace("=", "").replace("/", "_")


def image_settings(task):
    """The task's image and patch size (TASK_SETTINGS); the rest of the recipe is train.py's defaults
    (the one the own-data work settled), not the published tables' RECIPE_2025."""
    return {k: TASK_SETTINGS[task][k] for k in ("image_size", "patch_size")}


def model_settings(model, task):
    """train.py settings of a model on a task: Q = N / d becomes a number of queries for the task's N."""
    settings = dict(MODELS[model])
    if "compress_queries" in settings:
        image = image_settings(task)
        n_tokens = (image["image_size"] // image["patch_size"]) ** 2
        settings["compress_queries"] = max(1, n_tokens // settings["compress_queries"])
    return settings


def jobs_for(tasks, models, seeds, n_layer, iters, root="runs/table5"):
    jobs = []
    for task in tasks:
        budget = dict(max_iters=iters[task], eval_interval=max(1, iters[task] // 10), num_show=0, n_layer=n_layer)
        if task == "shapes":  # its three published seeds were run with train.py's recipe of then: zero-
            # initialised position embeddings, one question a picture, images not moved, kinds drawn alike,
            # a vision stage of a fifth of the steps (none for blind); pinned so that a rerun matches them.
            budget.update(pos_std=0.0, questions_per_image=1, augment_shift=0, focus_errors=False)
        else:  # charts and text: train.py's defaults (the recipe the own-data work settled), but kinds
            # drawn by 0.1 + their error rate: the draw of their first seeds, run before the hardest-first
            # draw became the default
            budget.update(focus_hardest=False)
        for model in models:
            for seed in seeds:
                settings = dict(dataset=task, **image_settings(task), **model_settings(model, task), **budget, seed=seed)
                if task == "shapes":
                    settings["vision_pretrain_iters"] = 0 if settings.get("blind") else iters[task] // 5
                jobs.append((f"{root}/{task}/{folder_name(model)}-s{seed}", settings))
    return jobs


def costs(task, settings):
    """Training cost (text tokens/s, activation MiB: 20 AdamW steps of batch 32, one CPU thread) and
    streaming cost (KV bytes a turn of T = 10 text tokens and one image adds, FLOPs per text token)."""
    config = casa.Config(**{k: v for k, v in settings.items() if k in casa.Config.__dataclass_fields__},
                         block_size=256)
    data = Dataset(resolve_dataset(task), "val", config.image_size)
    tok_s, memory = train_speed(config, data, 32, 20, "cpu")
    per_turn = casa.kv_cache_bytes(config, 2, 10) - casa.kv_cache_bytes(config, 1, 10)
    return dict(tok_s=tok_s, activation_mib=memory / 2**20, kv_per_turn_kib=per_turn / 1024,
                mflop_per_token=casa.flops_per_text_token(config, 10)["total"] / 1e6, kv=casa.kv_formula(config),
                layers=config.layer_counts())


def main(argv=None):
    configurator.apply(globals(), argv)
    args = SimpleNamespace(**configurator.settings(globals()))
    check_settings(vars(args), n_layer=AT_LEAST_1, charts_iters=AT_LEAST_1, text_iters=AT_LEAST_1, shapes_iters=AT_LEAST_1,
                   jobs=AT_LEAST_1, threads=AT_LEAST_1)
    task_list = parse_names(args.tasks, "tasks", ["charts", "shapes", "text"])
    model_list = parse_names(args.models, "models", MODELS)
    seed_list = parse_seeds(args.seeds)
    iters = {"charts": args.charts_iters, "text": args.text_iters, "shapes": args.shapes_iters}
    jobs = jobs_for(task_list, model_list, seed_list, args.n_layer, iters)
    # the published table's runs keep their logs in docs/runs/ (runs.run_all), so that its three
    # seeds can be trained over several days
    published_jobs = jobs_for(parse_names(DEFAULTS["tasks"], "tasks"), list(MODELS), parse_seeds(DEFAULTS["seeds"]),
                              DEFAULTS["n_layer"], {"charts": DEFAULTS["charts_iters"], "text": DEFAULTS["text_iters"],
                                                    "shapes": DEFAULTS["shapes_iters"]})
    results = run_all(jobs, args.jobs, args.threads, keep_logs={d for d, s in jobs if (d, s) in published_jobs})
    torch.set_num_threads(1)
    text, data = "", {}
    for task in task_list:
        rows, kinds = [], None
        for model in model_list:
            finals = [results[f"runs/table5/{task}/{folder_name(model)}-s{s}"] for s in seed_list]
            kinds = kinds or list(finals[0].get("accuracy_by_kind", {}))
            settings = dict(image_settings(task), **model_settings(model, task), n_layer=args.n_layer)
            settings.pop("blind", None)
            c = costs(task, settings)
            d = data.setdefault(task, {})[model] = dict(
                accuracy=[f["accuracy"] for f in finals], shuffled=[f["shuffled_accuracy"] for f in finals],
                by_kind={k: [f["accuracy_by_kind"][k] for f in finals] for k in kinds},
                train_min=[f["train_s"] / 60 for f in finals], **c)
            n_sa, n_ca = c["layers"]
            rows.append([model, f"{n_sa} SA, {n_ca} CA" if model != "blind" else "", mean_spread(d["accuracy"]),
                         *(mean_spread(d["by_kind"][k]) for k in kinds), mean_spread(d["shuffled"]),
                         f"{c['tok_s']:,.0f}", f"{c['activation_mib']:.0f}", c["kv"], f"{c['kv_per_turn_kib']:.0f}",
                         f"{c['mflop_per_token']:.1f}", f"{sum(d['train_min']) / len(seed_list):.0f}"])
        header = ["model", "layers", "accuracy", *(k.split(": ", 1)[-1] for k in kinds), "images shuffled",
                  "train tok/s", "activations MiB", "#KV", "KV KiB a turn", "MFLOP / text token", "train min"]
        text += (f"\n\n{task}, {iters[task]} steps, {args.n_layer} layers x 128, "
                 f"{'mean ± std over seeds ' + args.seeds if len(seed_list) > 1 else 'seed ' + args.seeds}:\n\n"
                 + markdown_table(header, rows))
    curves_text, lines = learning_curves(task_list, model_list, seed_list, iters)
    text += curves_text
    intro = ("Table 5 at toy scale: CASA with CA every n-th block (5a), insertion with Q of the N image tokens "
             "(5b), blind beside; train.py's defaults otherwise (image and patch size per task). Training "
             "cost: 20 AdamW steps of batch 32 on one CPU thread; KV a turn: one image and 10 text tokens, float32.")
    published = is_default(vars(args), DEFAULTS)
    write_result("table5", intro + text, data, published=published)
    png = os.path.join(ROOT, "docs/table5.png" if published else "runs/table5.png")
    plots.accuracy_panels(lines, task_list, model_list, png, colors=COLORS)
    print(f"picture: {os.path.relpath(png, ROOT)}")
    return data


def learning_curves(tasks, models, seeds, iters):
    """Accuracy at each evaluation, mean over seeds, as a markdown table per task (every other
    evaluation, to keep it narrow), and the curves for plots.accuracy_panels."""
    text, lines = "", {}
    for task in tasks:
        runs = {m: [curve(f"runs/table5/{task}/{folder_name(m)}-s{s}") for s in seeds] for m in models}
        lines.update({(task, m): c for m, c in runs.items()})
        steps = [point[0] for point in runs[models[0]][0]]
        shown = [st for i, st in enumerate(steps) if i % 2 == 1 or st == steps[-1]]
        rows = []
        for m in models:
            at = {st: [] for st in shown}
            for c in runs[m]:
                for step, _, acc, *_ in c:
                    if step in at:
                        at[step].append(acc)
            rows.append([m, *(f"{sum(a) / len(a):.3f}" if a else "" for a in at.values())])
        text += (f"\n\n{task}: accuracy along training (the first 400 validation answers, all of them at "
                 f"the last step), mean over seeds {','.join(map(str, seeds))}:\n\n"
                 + markdown_table(["model", *(f"step {st}" for st in shown)], rows))
    return text, lines


if __name__ == "__main__":
    main()
