"""
shapes: the coarse default task. One big simple shape in one of 6 colours on a
plain gray background; one question per image, one of three kinds:
    "what color is the shape?" -> "red"               (chance 1/6)
    "what shape is this?"      -> "circle"            (chance 1/5)
    "describe the image."      -> "an orange circle"  (chance 1/30)
Shapes are large (diameter 24-48 px of 64) so they stay clear at 32x32.

python -m data.shapes.prepare [--out=DIR] [--n_train=N] [--n_val=N] [--seed=S]
"""

import os

from PIL import ImageDraw

import configurator
from data.common import COLORS, SHAPES, SIZE, a_an, canvas, contrasting_gray, draw_shape, prepare

# -----------------------------------------------------------------------------
# settings, each one overridable on the command line as --name=value (configurator.py)
out = os.path.dirname(os.path.abspath(__file__))  # output folder (default: this script's folder)
n_train = 4000  # training samples
n_val = 400  # validation samples
seed = 1337  # the same seed writes byte-identical files
# -----------------------------------------------------------------------------

QUESTIONS = {
    "color": "what color is the shape?",
    "shape": "what shape is this?",
    "caption": "describe the image.",
}


def make_sample(rng, stem):
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    r = rng.randint(12, 24)
    cx, cy = rng.randint(r, SIZE - 1 - r), rng.randint(r, SIZE - 1 - r)
    img = canvas(contrasting_gray(rng, COLORS[color]))
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, COLORS[color])

    kind = rng.choice(list(QUESTIONS))
    answer = {"color": color, "shape": shape, "caption": a_an(f"{color} {shape}")}[kind]
    path = f"images/{stem}.png"
    # single image, single turn: the shorthand form; no marker -> image goes first
    return {"image": path, "prompt": QUESTIONS[kind], "answer": answer, "task": "shapes"}, [(path, img)]


if __name__ == "__main__":
    configurator.apply(globals())
    prepare("shapes", make_sample, out, n_train, n_val, seed)
