"""
The paper's Table 3 at toy scale: turn a trained insertion model into a cross-attention one.
The insertion models of experiments/accuracy.py are the starting points; train.py --init_from
copies their vision encoder and text transformer, initialises each CA layer from the same
block's self-attention, and trains with the backbone frozen, for the same step budget:

  adapted: CA + last vision block   --freeze=vision_but_last,text (the paper's recipe)
  adapted: CA only                  --freeze=vision,text

and compares with the insertion model it started from and with CA trained from scratch.

    python -m experiments.adaptation                 # shapes, 3 seeds: ~2.5 min on 2 cores (after accuracy.py)
    python -m experiments.adaptation --tasks=shapes,charts

Runs go to runs/adaptation/<task>/<setting>-s<seed>/; the table to docs/results/adaptation.md.
"""

from types import SimpleNamespace

import configurator
from experiments.accuracy import BUDGET, jobs_for
from experiments.runs import (AT_LEAST_1, RECIPE_2025, check_settings, is_default, markdown_table, mean_spread,
                              parse_names, parse_seeds, run_all, write_result)

# -----------------------------------------------------------------------------
tasks = "shapes"
seeds = "1,2,3"
jobs = 2
threads = 1
# -----------------------------------------------------------------------------
DEFAULTS = configurator.settings(globals())  # only a run with these publishes its table (runs.is_default)

SETTINGS = {  # row name -> --freeze
    "adapted: CA + last vision block": "vision_but_last,text",
    "adapted: CA only": "vision,text",
}


def main(argv=None):
    configurator.apply(globals(), argv)
    args = SimpleNamespace(**configurator.settings(globals()))
    check_settings(vars(args), jobs=AT_LEAST_1, threads=AT_LEAST_1)
    tasks, seeds = parse_names(args.tasks, "tasks"), parse_seeds(args.seeds)

    # the starting points and the from-scratch reference (no-ops when accuracy.py already ran them)
    base = run_all(jobs_for(tasks, ["insertion", "ca"], seeds), args.jobs, args.threads)
    jobs = []
    for task in tasks:
        for name, freeze in SETTINGS.items():
            tag = freeze.replace(",", "+")
            for seed in seeds:
                settings = dict(init_from=f"runs/accuracy/{task}/insertion-s{seed}/ckpt.pt", variant="ca",
                                freeze=freeze, dataset=task, seed=seed, **BUDGET, **RECIPE_2025)
                jobs.append((f"runs/adaptation/{task}/{tag}-s{seed}", settings))
    adapted = run_all(jobs, args.jobs, args.threads)

    rows, data = [], {}
    sources = {"insertion (the starting point)": "runs/accuracy/{task}/insertion-s{seed}",
               "ca from scratch": "runs/accuracy/{task}/ca-s{seed}"}
    sources.update({name: f"runs/adaptation/{{task}}/{freeze.replace(',', '+')}-s{{seed}}" for name, freeze in SETTINGS.items()})
    for name, pattern in sources.items():
        row = [name]
        for task in tasks:
            recs = [{**base, **adapted}[pattern.format(task=task, seed=s)] for s in seeds]
            acc, loss = [r["accuracy"] for r in recs], [r["val_loss"] for r in recs]
            data.setdefault(name, {})[task] = dict(accuracy=acc, val_loss=loss)
            row += [mean_spread(acc), mean_spread(loss)]
        rows.append(row)
    header = ["model"] + [f"{t} {m}" for t in tasks for m in ("accuracy", "val loss")]
    text = (f"Adaptation: insertion -> ca with the backbone frozen, {BUDGET['max_iters']} steps (lr_new 1e-3 for "
            f"the CA layers, lr_pretrained 1e-4 for the last vision block), the same budget as the models "
            f"trained from scratch; mean ± std over seeds {args.seeds}.\n\n" + markdown_table(header, rows))
    write_result("adaptation", text, data, published=is_default(vars(args), DEFAULTS))


if __name__ == "__main__":
    main()
