"""
video: short clips (6-10 frames at 2 fps) of shapes moving on a white canvas,
one frame per turn. Two kinds of clip, about half each, in the same files:

video_caption: the first turn's prompt asks for commentary ("<|image|> say what
changes"), every later prompt is just the frame's marker, and each answer is a
live commentary line about what changed since the previous frame (the first
names what it sees left to right, or top to bottom when one is above the other):
    "a red circle and a blue square appear", "the red circle moves right",
    "the blue square turns green", "a yellow cross appears",
    "the red circle disappears", "nothing changes"
video_memory: one shape; the first prompt asks for commentary without names
("<|image|> say what changes, without names"), so the commentary never names its
colour or shape ("a shape appears", "it moves up", "it changes color", ...); the
first prompts tell the two kinds apart, as a one-shape first frame alone cannot.
The LAST turn asks about the FIRST frame, e.g. "<|image|> what color was the
shape in the first frame?" -> "red", where the last frame always shows a
different colour (or shape). A model that only sees the latest frame cannot answer it.

python -m data.video.prepare [--out=DIR] [--n_train=N] [--n_val=N] [--seed=S]
(N counts clips, not frames.)
"""

import os

from PIL import ImageDraw

import configurator
from data.common import COLORS, MARKER, SHAPES, SIZE, a_an, canvas, draw_shape, prepare

# -----------------------------------------------------------------------------
# settings, each one overridable on the command line as --name=value (configurator.py)
out = os.path.dirname(os.path.abspath(__file__))  # output folder (default: this script's folder)
n_train = 4000  # training clips
n_val = 200  # validation clips
seed = 1337  # the same seed writes byte-identical files
# -----------------------------------------------------------------------------

FPS = 2
R, STEP = 8, 16                # shape radius and how far one move goes: one object width, one 16 px token
LO, HI = R + 1, SIZE - 2 - R   # allowed centres, so shapes never touch the border
BACKGROUND = (255, 255, 255)   # fixed, so "appears" / "disappears" are unambiguous
DIRECTIONS = {"left": (-STEP, 0), "right": (STEP, 0), "up": (0, -STEP), "down": (0, STEP)}
# the first prompt of each kind of clip: without it, a first frame with one shape could start either
# kind, and its first comment ("a red circle appears" or "a shape appears") would be a coin toss
FIRST_PROMPTS = {"video_caption": "say what changes", "video_memory": "say what changes, without names"}
MEMORY_QUESTIONS = {
    "color": "what color was the shape in the first frame?",
    "shape": "what shape was in the first frame?",
}


# -----------------------------------------------------------------------------
# a scene is a list of objects: dict(color=, shape=, x=, y=)

def name(obj):
    return f"{obj['color']} {obj['shape']}"


def render(objs):
    img = canvas(BACKGROUND)
    d = ImageDraw.Draw(img)
    for o in objs:
        draw_shape(d, o["shape"], o["x"], o["y"], R, COLORS[o["color"]])
    return img


def is_free(x, y, objs, skip=None):
    """A shape at (x, y) stays inside the frame and does not overlap the others."""
    inside = LO <= x <= HI and LO <= y <= HI
    return inside and all(max(abs(x - o["x"]), abs(y - o["y"])) > 2 * R + 1
                          for o in objs if o is not skip)


def unused(rng, values, objs, key):
    """A value of `key` that no object on screen has, so that "the red circle"
    (and even "the red one") always names exactly one object."""
    taken = {o[key] for o in objs}
    return rng.choice([v for v in values if v not in taken])


def spawn(rng, objs):
    obj = dict(color=unused(rng, list(COLORS), objs, "color"),
               shape=unused(rng, SHAPES, objs, "shape"))
    while True:
        obj["x"], obj["y"] = rng.randint(LO, HI), rng.randint(LO, HI)
        if is_free(obj["x"], obj["y"], objs):
            return obj


def try_move(rng, obj, objs):
    """Move obj one step in a random possible direction; return it, or None."""
    dirs = [k for k, (dx, dy) in DIRECTIONS.items() if is_free(obj["x"] + dx, obj["y"] + dy, objs, skip=obj)]
    if not dirs:
        return None
    k = rng.choice(dirs)
    obj["x"] += DIRECTIONS[k][0]
    obj["y"] += DIRECTIONS[k][1]
    return k


def pick(rng, weights):
    return rng.choices(list(weights), weights=list(weights.values()))[0]


# -----------------------------------------------------------------------------
# the two kinds of clip: each returns (frames, prompts, answers)

def caption_step(rng, objs):
    """Change exactly one thing in the scene (so the commentary is unambiguous)
    and return the commentary line."""
    events = {"move": 4, "recolor": 1, "still": 0.7}
    if len(objs) < 2:  # at most two objects; never an empty scene
        events["appear"] = 1.5
    else:
        events["disappear"] = 1
    event = pick(rng, events)
    if event == "appear":
        objs.append(spawn(rng, objs))
        return f"{a_an(name(objs[-1]))} appears"
    if event == "disappear":
        return f"the {name(objs.pop(rng.randrange(len(objs))))} disappears"
    obj = rng.choice(objs)
    if event == "recolor":
        old = name(obj)
        obj["color"] = unused(rng, list(COLORS), objs, "color")
        return f"the {old} turns {obj['color']}"
    if event == "move" and (direction := try_move(rng, obj, objs)):
        return f"the {name(obj)} moves {direction}"
    return "nothing changes"


def reading_order(objs):
    """The objects as the first comment names them: left to right, or top to bottom when one is
    above the other (their x closer than R): the order is then always visible in the frame."""
    if len(objs) == 2 and abs(objs[0]["x"] - objs[1]["x"]) <= R:
        return sorted(objs, key=lambda o: o["y"])
    return sorted(objs, key=lambda o: o["x"])


def caption_clip(rng, n_frames):
    objs = []
    for _ in range(rng.choice((1, 2))):
        objs.append(spawn(rng, objs))
    # in the order they are seen (the order they were made in is not in the picture)
    first = " and ".join(a_an(name(o)) for o in reading_order(objs)) + (" appears" if len(objs) == 1 else " appear")
    frames, answers = [render(objs)], [first]
    for _ in range(n_frames - 1):
        answers.append(caption_step(rng, objs))
        frames.append(render(objs))
    prompts = [f"{MARKER} {FIRST_PROMPTS['video_caption']}"] + [MARKER] * (n_frames - 1)
    return frames, prompts, answers


def change(rng, obj, key, avoid):
    values = list(COLORS) if key == "color" else SHAPES
    obj[key] = rng.choice([v for v in values if v not in (obj[key], avoid)])


def memory_step(rng, obj):
    event = pick(rng, {"move": 3, "color": 1, "shape": 1, "still": 0.5})
    if event in ("color", "shape"):
        change(rng, obj, event, avoid=obj[event])
        return f"it changes {event}"
    if event == "move" and (direction := try_move(rng, obj, [obj])):
        return f"it moves {direction}"
    return "nothing changes"


def memory_clip(rng, n_frames):
    obj = spawn(rng, [])
    first = dict(obj)
    ask = rng.choice(list(MEMORY_QUESTIONS))
    # the commentary never names colour or shape, so the final answer has to
    # come from the first frame itself, not from the text of earlier turns
    frames, answers = [render([obj])], ["a shape appears"]
    for _ in range(n_frames - 2):
        answers.append(memory_step(rng, obj))
        frames.append(render([obj]))
    if obj[ask] == first[ask]:  # the last frame must not show the answer
        change(rng, obj, ask, avoid=first[ask])
    frames.append(render([obj]))
    answers.append(first[ask])
    prompts = ([f"{MARKER} {FIRST_PROMPTS['video_memory']}"] + [MARKER] * (n_frames - 2)
               + [f"{MARKER} {MEMORY_QUESTIONS[ask]}"])
    return frames, prompts, answers


def make_sample(rng, stem):
    task = rng.choice(("video_caption", "video_memory"))
    clip = caption_clip if task == "video_caption" else memory_clip
    frames, prompts, answers = clip(rng, rng.randint(6, 10))
    paths = [f"images/{stem}_f{j:02d}.png" for j in range(len(frames))]
    record = {
        "images": paths,
        "turns": [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)],
        "task": task,
        "fps": FPS,
    }
    return record, list(zip(paths, frames))


if __name__ == "__main__":
    configurator.apply(globals())
    prepare("video", make_sample, out, n_train, n_val, seed)
