"""
charts: a fine-grained toy ChartQA. A bar chart of 3-5 bars labelled a, b, c..
with integer values 0-9, drawn over a faint grid (one line per unit, 5 px
apart, a darker line and a tick label at 5), and one question:
    "what is the value of bar b?" -> "7"
    "which bar is the tallest?"   -> "c"
    "which bar is the shortest?"  -> "a"
Reading a value means counting 5 px grid steps: easy at 64 px, hard at 32.

python -m data.charts.prepare [--out=DIR] [--n_train=N] [--n_val=N] [--seed=S]
"""

import os

from PIL import ImageDraw

import configurator
from data.common import COLORS, SIZE, canvas, prepare, text_mask

# -----------------------------------------------------------------------------
# settings, each one overridable on the command line as --name=value (configurator.py)
out = os.path.dirname(os.path.abspath(__file__))  # output folder (default: this script's folder)
n_train = 20000  # training samples
n_val = 400  # validation samples
seed = 1337  # the same seed writes byte-identical files
# -----------------------------------------------------------------------------

X0, X1 = 9, SIZE - 1   # plot area, left of X0 is room for tick labels
BASE, UNIT = 52, 5     # y of value 0 and pixels per unit: value 9 tops out at y=7
LABELS = "abcde"


def draw_chart(values, color):
    img = canvas((255, 255, 255))
    d = ImageDraw.Draw(img)
    for k in range(1, 10):
        y = BASE - UNIT * k
        d.line((X0, y, X1, y), fill=(190, 190, 190) if k == 5 else (228, 228, 228))
    for k in (0, 5):
        tick = text_mask(str(k))
        img.paste((120, 120, 120), (1, BASE - UNIT * k - tick.height // 2), tick)
    d.line((X0 - 1, BASE - UNIT * 9, X0 - 1, BASE), fill=(60, 60, 60))  # y axis
    d.line((X0 - 1, BASE, X1, BASE), fill=(60, 60, 60))                  # x axis

    slot = (X1 - X0) / len(values)
    half = round(slot * 0.3)
    for i, v in enumerate(values):
        cx = round(X0 + slot * (i + 0.5))
        if v > 0:  # a 0 bar is just its label, as in a real chart
            d.rectangle((cx - half, BASE - UNIT * v, cx + half, BASE - 1), fill=color)
        label = text_mask(LABELS[i])
        img.paste((0, 0, 0), (cx - label.width // 2, SIZE - 3 - label.height), label)
    return img


def make_sample(rng, stem):
    n = rng.randint(3, 5)
    kind = rng.choice(("value", "value", "tallest", "shortest"))
    while True:  # tallest/shortest questions need a unique answer
        values = [rng.randint(0, 9) for _ in range(n)]
        target = {"value": None, "tallest": max(values), "shortest": min(values)}[kind]
        if target is None or values.count(target) == 1:
            break

    if kind == "value":
        i = rng.randrange(n)
        prompt, answer = f"what is the value of bar {LABELS[i]}?", str(values[i])
    else:
        prompt, answer = f"which bar is the {kind}?", LABELS[values.index(target)]

    img = draw_chart(values, COLORS[rng.choice(list(COLORS))])
    path = f"images/{stem}.png"
    return {"image": path, "prompt": prompt, "answer": answer, "task": "charts"}, [(path, img)]


if __name__ == "__main__":
    configurator.apply(globals())
    prepare("charts", make_sample, out, n_train, n_val, seed)
