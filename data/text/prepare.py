"""
text: fine-grained reading. A 2-4 digit number or a 3-4 letter word in
Pillow's built-in bitmap font (drawn 2x: ~12x14 px per character), at a random
position and colour on a plain gray background:
    "what number is written?" -> "4271"
    "what word is written?"   -> "fish"
Legible at 48-64 px; at 32 px the strokes start to merge, which is intended.

python -m data.text.prepare [--out=DIR] [--n_train=N] [--n_val=N] [--seed=S]
"""

import os

import configurator
from data.common import COLORS, SIZE, canvas, contrasting_gray, prepare, text_mask

# -----------------------------------------------------------------------------
# settings, each one overridable on the command line as --name=value (configurator.py)
out = os.path.dirname(os.path.abspath(__file__))  # output folder (default: this script's folder)
n_train = 40000  # training samples
n_val = 400  # validation samples
seed = 1337  # the same seed writes byte-identical files
# -----------------------------------------------------------------------------

SCALE = 2  # bitmap glyphs are only ~7 px tall; doubled they survive a resize to 48
WORDS = (
    "cat dog sun red box cup hat map pen key egg ice owl bee fox "
    "fish bird tree ship star moon lamp book frog cake door rain "
    "milk rock sand wind leaf king gold blue jump kite"
).split()
INK = dict(COLORS, black=(0, 0, 0), white=(255, 255, 255))


def make_sample(rng, stem):
    if rng.random() < 0.6:
        n = rng.randint(2, 4)  # pick the length first, else 90% would be 4-digit
        text = str(rng.randint(10 ** (n - 1), 10 ** n - 1))  # no leading zero
        prompt = "what number is written?"
    else:
        text = rng.choice(WORDS)
        prompt = "what word is written?"
    ink = INK[rng.choice(list(INK))]
    img = canvas(contrasting_gray(rng, ink, min_diff=100))
    mask = text_mask(text, SCALE)  # at most 48 x 18 px, so it always fits
    x = rng.randint(1, SIZE - 1 - mask.width)
    y = rng.randint(1, SIZE - 1 - mask.height)
    img.paste(ink, (x, y), mask)
    path = f"images/{stem}.png"
    return {"image": path, "prompt": prompt, "answer": text, "task": "text"}, [(path, img)]


if __name__ == "__main__":
    configurator.apply(globals())
    prepare("text", make_sample, out, n_train, n_val, seed)
