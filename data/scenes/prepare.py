"""
scenes: the project's stand-in for a real VQA set. One to four shapes of varied shape, colour and
size on a varied background, and about ten questions about each picture, one jsonl line each (as
real VQA sets are laid out: the same image on several lines), of five kinds:
    existence  "is there a red circle?"                    -> "yes" / "no"
    colour     "what color is the triangle?"                -> "blue"     (asked of a shape seen once)
    shape      "what shape is the green object?"            -> "cross"    (the object of a given colour)
    count      "how many shapes are there?", "how many circles are there?" -> "0" ... "4"
    relation   "is the red shape left of the blue shape?"  -> "yes" / "no"
Most answers are yes or no, as in real sets. Objects have distinct colours (so "the green object"
is one object); shapes are 8-22 px across on a 64 px image, so the smallest are a few pixels at 32.
Each line also keeps the scene ("objects": shape, colour, centre, radius); the trainer ignores it.

python -m data.scenes.prepare [--out=DIR] [--n_train=N] [--n_val=N] [--seed=S]   (N counts images)
"""

import os

from PIL import Image, ImageDraw

import configurator
from data.common import COLORS, SHAPES, SIZE, a_an, draw_shape, prepare

# -----------------------------------------------------------------------------
# settings, each one overridable on the command line as --name=value (configurator.py)
out = os.path.dirname(os.path.abspath(__file__))  # output folder (default: this script's folder)
n_train = 5000  # training images (about ten questions each)
n_val = 300  # validation images (about ten questions each)
seed = 1337  # the same seed writes byte-identical files
# -----------------------------------------------------------------------------

PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "cross": "crosses"}
QUESTIONS_PER_IMAGE = 10
MIN_DX = 8  # left/right is asked only of two objects whose centres lie this many pixels apart


def background(rng, colors):
    """A light or dark tint with a gentle gradient, never close to any object's colour."""
    while True:
        base = [rng.randint(205, 250) for _ in range(3)] if rng.random() < 0.6 else [rng.randint(15, 70) for _ in range(3)]
        if all(sum((a - b) ** 2 for a, b in zip(base, COLORS[c])) ** 0.5 > 110 for c in colors):
            break
    img, step = Image.new("RGB", (SIZE, SIZE)), rng.uniform(-0.3, 0.3)  # brightness change per pixel
    draw, vertical = ImageDraw.Draw(img), rng.random() < 0.5
    for i in range(SIZE):
        shade = tuple(max(0, min(255, round(v + step * (i - SIZE / 2)))) for v in base)
        draw.line((0, i, SIZE - 1, i) if vertical else (i, 0, i, SIZE - 1), fill=shade)
    return img


def place_objects(rng):
    """1-4 objects with distinct colours that do not touch: [dict(shape, color, x, y, r)]."""
    n = rng.randint(1, 4)
    colors = rng.sample(list(COLORS), n)
    while True:
        objects = []
        for color in colors:
            r = rng.randint(4, 11)
            x, y = rng.randint(r + 1, SIZE - 2 - r), rng.randint(r + 1, SIZE - 2 - r)
            if any((x - o["x"]) ** 2 + (y - o["y"]) ** 2 < (r + o["r"] + 3) ** 2 for o in objects):
                break
            objects.append(dict(shape=rng.choice(SHAPES), color=color, x=x, y=y, r=r))
        if len(objects) == n:
            return objects


def existence(rng, objects):
    """'is there a ...?' with yes and no equally likely; a 'no' often differs from an object in one
    attribute only, so that colour and shape must be read together."""
    present = {(o["color"], o["shape"]) for o in objects}
    form = rng.choice(("both", "both", "shape", "color"))
    if rng.random() < 0.5:  # yes
        o = rng.choice(objects)
        thing = {"both": f"{o['color']} {o['shape']}", "shape": o["shape"], "color": f"{o['color']} shape"}[form]
        return f"is there {a_an(thing)}?", "yes"
    if form == "shape":
        missing = [s for s in SHAPES if s not in {o["shape"] for o in objects}]
        return (f"is there {a_an(rng.choice(missing))}?", "no") if missing else existence(rng, objects)
    if form == "color":
        return f"is there {a_an(rng.choice([c for c in COLORS if c not in {o['color'] for o in objects}]))} shape?", "no"
    while True:
        o = rng.choice(objects)  # change its colour or its shape
        color, shape = (rng.choice(list(COLORS)), o["shape"]) if rng.random() < 0.5 else (o["color"], rng.choice(SHAPES))
        if (color, shape) not in present:
            return f"is there {a_an(f'{color} {shape}')}?", "no"


def questions(rng, objects):
    """About QUESTIONS_PER_IMAGE (prompt, answer) pairs for one scene, no prompt twice."""
    shapes = [o["shape"] for o in objects]
    unique = [o for o in objects if shapes.count(o["shape"]) == 1]
    pairs = [(a, b) for a in objects for b in objects if a is not b and abs(a["x"] - b["x"]) >= MIN_DX]
    qa = {}

    def add(q, a):
        qa.setdefault(q, a)

    o = rng.choice(objects)
    add(f"what shape is the {o['color']} object?", o["shape"])
    if unique:
        o = rng.choice(unique)
        add(f"what color is the {o['shape']}?", o["color"])
    add("how many shapes are there?", str(len(objects)))
    shape = rng.choice(SHAPES)
    add(f"how many {PLURAL[shape]} are there?", str(shapes.count(shape)))
    for _ in range(2 if pairs else 0):
        a, b = rng.choice(pairs)
        side = rng.choice(("left", "right"))
        truth = a["x"] < b["x"] if side == "left" else a["x"] > b["x"]
        add(f"is the {a['color']} shape {side} of the {b['color']} shape?", "yes" if truth else "no")
    for _ in range(50):  # the rest: existence
        if len(qa) >= QUESTIONS_PER_IMAGE:
            break
        add(*existence(rng, objects))
    items = list(qa.items())
    rng.shuffle(items)
    return items


def make_sample(rng, stem):
    objects = place_objects(rng)
    img = background(rng, [o["color"] for o in objects])
    draw = ImageDraw.Draw(img)
    for o in objects:
        draw_shape(draw, o["shape"], o["x"], o["y"], o["r"], COLORS[o["color"]])
    path = f"images/{stem}.png"
    records = [{"image": path, "prompt": q, "answer": a, "task": "scenes", "objects": objects}
               for q, a in questions(rng, objects)]
    return records, [(path, img)]


if __name__ == "__main__":
    configurator.apply(globals())
    prepare("scenes", make_sample, out, n_train, n_val, seed)
