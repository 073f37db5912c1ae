"""
Shared helpers for the self-made datasets in data/<name>/prepare.py.

Every dataset is written in the one folder format that users bring their own
data in (see data/README.md): train.jsonl + val.jsonl + images/, with image
paths relative to the folder. A prepare script only has to say how to make
ONE sample from a seeded RNG, and hold its settings (--out, --n_train, --n_val,
--seed, through configurator.py); everything else (RNG streams, writing files,
the summary line) lives here so the scripts stay short. Each runs from the
repo root as a module: python -m data.<name>.prepare
"""

import functools
import glob
import json
import os
import random
import sys
import time

from PIL import Image, ImageDraw, ImageFont

SIZE = 64             # every image is SIZE x SIZE RGB; the model resizes to its own image_size
MARKER = "<|image|>"  # in a prompt, binds the next image of the sample (in order)

# a small palette of well separated colours; names are the exact answers
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")


def a_an(word):
    """'a red circle' but 'an orange circle'."""
    return ("an " if word[0] in "aeiou" else "a ") + word


# -----------------------------------------------------------------------------
# drawing

def canvas(background):
    return Image.new("RGB", (SIZE, SIZE), background)


def draw_shape(draw, shape, cx, cy, r, fill):
    """Draw `shape` centred on the integer point (cx, cy), spanning at most
    cx-r..cx+r. All offsets depend on r only, so the same shape looks pixel-
    identical wherever it is placed (tests rely on that)."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = round(r * 0.85)  # a bit smaller than r so its area is close to the circle's
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        b = round(r * 0.75)
        draw.polygon([(cx, cy - r), (cx + r, cy + b), (cx - r, cy + b)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        t = max(1, round(r * 0.3))
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def luminance(rgb):
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def contrasting_gray(rng, rgb, min_diff=90):
    """A random gray that stays clearly distinguishable from `rgb`, so the
    background varies (the model must look at the object, not the backdrop)
    without ever hiding the object."""
    lum = luminance(rgb)
    grays = [g for g in range(0, 256, 5) if abs(g - lum) >= min_diff]
    g = rng.choice(grays)
    return (g, g, g)


@functools.lru_cache(maxsize=None)  # decoding the embedded font is slow-ish; do it once
def bitmap_font():
    """Pillow's built-in bitmap font (6 px per character, ~7 px tall glyphs).
    Since Pillow 10.1 load_default() returns a FreeType font when FreeType is
    available; load_default_imagefont() is the old bitmap font, which is
    embedded in Pillow (works offline) and renders identically everywhere."""
    if hasattr(ImageFont, "load_default_imagefont"):
        return ImageFont.load_default_imagefont()
    return ImageFont.load_default()  # older Pillow: this IS the bitmap font


def text_mask(text, scale=1):
    """An "L" mask of `text` in the bitmap font, cropped to its ink and
    enlarged `scale` times with nearest-neighbour (keeps pixels crisp)."""
    font = bitmap_font()
    mask = Image.new("L", (6 * len(text) + 8, 16), 0)
    ImageDraw.Draw(mask).text((1, 1), text, font=font, fill=255)
    mask = mask.crop(mask.getbbox())
    if scale != 1:
        mask = mask.resize((mask.width * scale, mask.height * scale), Image.NEAREST)
    return mask


# -----------------------------------------------------------------------------
# running a prepare script

def write_dataset(name, make_sample, out, n_train, n_val, seed):
    """make_sample(rng, stem) -> (record, [(relative_path, PIL image), ...]), or a list of records
    that share those images (several questions about one picture, one jsonl line each, as real VQA
    sets are laid out). `stem` (e.g. "train_00042") is unique per call, for naming its images.
    Returns (jsonl lines written, images written).

    Every file appears whole (written under a temporary name, then renamed), and train.jsonl
    appears last: train.py takes a folder with a train.jsonl as ready, so a run started while
    another one prepares the same dataset never reads a half-written file. A run that fails (a full
    disk) or is interrupted leaves no temporary file behind."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    tmp = f".{os.getpid()}.tmp"  # per process: two preparers never write the same temporary file
    n_lines = n_images = 0
    try:
        for split, n in (("val", n_val), ("train", n_train)):
            # one RNG stream per split; a string seed is hashed with sha512 by
            # random.Random, so it is stable across runs and PYTHONHASHSEED
            rng = random.Random(f"{name}/{split}/{seed}")
            path = os.path.join(out, f"{split}.jsonl")
            with open(path + tmp, "w", encoding="utf-8", newline="\n") as f:
                for i in range(n):
                    record, images = make_sample(rng, f"{split}_{i:05d}")
                    for image_path, img in images:
                        img.save(os.path.join(out, image_path) + tmp, format="PNG")
                        os.replace(os.path.join(out, image_path) + tmp, os.path.join(out, image_path))
                    records = record if isinstance(record, list) else [record]
                    f.writelines(json.dumps(r) + "\n" for r in records)
                    n_lines, n_images = n_lines + len(records), n_images + len(images)
            os.replace(path + tmp, path)
    except BaseException:
        for left in glob.glob(os.path.join(glob.escape(out), "**", "*" + tmp), recursive=True):
            os.remove(left)
        raise
    return n_lines, n_images


def prepare(name, make_sample, out, n_train, n_val, seed):
    """A prepare script's work, once configurator has set its settings: check them, write the
    dataset, say what was written. Every problem ends the script with one error line."""
    for key, n in (("n_train", n_train), ("n_val", n_val)):
        if n < 1:  # train.py needs both splits: an empty one is an error there
            sys.exit(f"error: --{key} must be at least 1 (a dataset needs training and validation samples), got {n}")
    if not out or (os.path.exists(out) and not os.path.isdir(out)):
        sys.exit(f"error: --out={out!r} is {'empty' if not out else 'a file'}: give a folder (made if missing)")
    t0 = time.time()
    try:
        n_lines, n_images = write_dataset(name, make_sample, out, n_train, n_val, seed)
    except OSError as e:  # a folder one cannot write to, a full disk
        sys.exit(f"error: cannot write {name} to {out}: {e}")
    except KeyboardInterrupt:
        print(f"interrupted: {out} holds part of the {name} files; run again to write them all", file=sys.stderr)
        sys.exit(130)
    what = f"{n_train} train / {n_val} val samples" if n_lines == n_train + n_val else \
        f"{n_train} train / {n_val} val images, {n_lines} questions"
    print(f"{name}: wrote {what} ({n_images} images) to {out} in {time.time() - t0:.1f}s")
