"""
The paper's Table 3 at toy scale: turn a trained insertion model into a cross-attention one.
The insertion models of experiments/accuracy.py are the starting points; train.py --init_from
copies their vision encoder and text transformer, initialises each CA layer from the same
block's self-attention, and trains with the backbone frozen, for the same step budget:

  adapted: CA + last vision block   --freeze=vision_but_last,text (the paper's recipe)
  adapted: CA only                  --freeze=vision,text

and compares with the insertion model it started from and with CA trained from scratch.

    python experiments/adaptation.py                 # shapes, 3 seeds: ~2.5 min on 2 cores (after accuracy.py)
    python experiments/adaptation.py --tasks=shapes,charts

Runs go to runs/adaptation/<task>/<setting>-s<seed>/; the table to docs/results/adaptation.md.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.accuracy import BUDGET, jobs_for  # noqa: E402
from experiments.runs import RECIPE_2025, is_default, markdown_table, mean_spread, run_all, write_result  # noqa: E402

SETTINGS = {  # row name -> --freeze
    "adapted: CA + last vision block": "vision_but_last,text",
    "adapted: CA only": "vision,text",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="shapes")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]

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
    write_result("adaptation", text, data, published=is_default(parser, args))


if __name__ == "__main__":
    main()
