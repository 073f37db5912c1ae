"""
Where attention goes: in the layers where text queries see text keys and image keys in ONE softmax
(ca_tv's CASA layers, insertion's self-attention), the share of attention that text tokens give
to image tokens, per layer and head (casa.attention_mass), for models trained by
experiments/accuracy.py and, for comparison, the same models untrained.

The v1 paper's "implicit gating": because the text keys compete in the same softmax, a layer can
turn the image down (give its attention to text) without any explicit gate.

    python -m experiments.attention                 # shapes models, seeds 1-3: ~10 s
    python -m experiments.attention --task=charts

Draws docs/attention.png (trained, mean over seeds; untrained for reference) and writes the numbers
to docs/results/attention.md (other settings: runs/results/, unless --out is given).
"""

import os
import sys
from types import SimpleNamespace

import torch

import casa
import configurator
from data.loader import Dataset
from experiments import plots
from experiments.runs import (AT_LEAST_1, ROOT, check_picture, check_settings, is_default, markdown_table,
                              parse_seeds, write_result)
from stream import load_model

MODELS = ["ca_tv", "insertion"]

# -----------------------------------------------------------------------------
task = "shapes"
seeds = "1,2,3"
samples = 200  # validation samples per model
out = "docs/attention.png"
# -----------------------------------------------------------------------------
DEFAULTS = configurator.settings(globals())  # only a run with these publishes its table (runs.is_default)


@torch.no_grad()
def mass_on(model, data, n_samples):
    """attention_mass over the first n_samples validation samples (full sequences, answers included),
    batched by length; averaged with each batch weighted by its size. (L, H) tensor."""
    by_len = {}
    for s in data.samples[:n_samples]:
        by_len.setdefault(len(s.ids), []).append(s)
    total, count = 0.0, 0
    for group in by_len.values():
        idx = torch.tensor([s.ids for s in group])
        images = torch.cat([data.sample_images(s) for s in group])
        total = total + casa.attention_mass(model, idx, images) * len(group)
        count += len(group)
    return total / count


def main(argv=None):
    configurator.apply(globals(), argv)
    args = SimpleNamespace(**configurator.settings(globals()))
    check_settings(vars(args), samples=AT_LEAST_1)
    check_picture("out", args.out, ROOT)
    seeds = parse_seeds(args.seeds)

    panels, rows, data = [], [], {}
    for name in MODELS:
        trained, untrained = [], []
        for seed in seeds:
            path = os.path.join(ROOT, f"runs/accuracy/{args.task}/{name}-s{seed}/ckpt.pt")
            if not os.path.exists(path):
                sys.exit(f"error: no checkpoint at {path}: run python -m experiments.accuracy --tasks={args.task} first")
            try:
                model, ckpt = load_model(path, "cpu")
                dataset = Dataset(ckpt.get("dataset_dir", ""), "val", model.config.image_size)
            except (OSError, ValueError) as e:  # not a checkpoint, weights that do not fit, its dataset gone
                sys.exit(f"error: {e}")
            trained.append(mass_on(model, dataset, args.samples))
            torch.manual_seed(seed)  # the same initialisation train.py started from
            untrained.append(mass_on(casa.VLM(model.config).eval(), dataset, args.samples))
        trained, untrained = torch.stack(trained), torch.stack(untrained)  # (seeds, L, H)
        data[name] = dict(trained=trained.tolist(), untrained=untrained.tolist())
        mean = trained.mean(0)
        panels.append(plots.heat_panel(f"{name}, trained on {args.task} (mean of {len(seeds)} seeds)", mean))
        panels.append(plots.heat_panel(f"{name}, untrained", untrained.mean(0)))
        per_layer = trained.mean(2)  # (seeds, L): head-averaged share per layer and seed
        for layer in range(per_layer.size(1)):
            xs = per_layer[:, layer]
            rows.append([name, layer, f"{untrained.mean(2)[:, layer].mean():.2f}", f"{xs.mean():.2f} ± {xs.std():.2f}",
                         f"{mean[layer].min():.2f} - {mean[layer].max():.2f}"])

    sheet = plots.grid_of(panels, cols=2)  # two columns (trained | untrained), one row per model
    published = is_default(vars(args), DEFAULTS)
    out = args.out if published or args.out != DEFAULTS["out"] else "runs/results/attention.png"
    os.makedirs(os.path.dirname(os.path.join(ROOT, out)), exist_ok=True)
    sheet.save(os.path.join(ROOT, out))
    print(f"wrote {out}")
    header = ["model", "layer", "untrained", "trained (mean ± std over seeds)", "trained, range over heads"]
    text = (f"Share of text-token attention on image keys, in the layers where text and image keys share a "
            f"softmax (casa.attention_mass), {args.task} validation samples (first {args.samples}, answers "
            f"included), head-averaged per layer; seeds {args.seeds}.\n\n" + markdown_table(header, rows))
    write_result("attention", text, data, published=published)


if __name__ == "__main__":
    main()
