"""
Tests for the self-made datasets: each data/<name>/prepare.py is run (small)
as the README runs it, `python -m data.<name>.prepare` in the repo root, twice
with one seed and once with another, and the output is checked against the
folder format described in data/README.md.
"""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data.common import COLORS, MARKER, SHAPES, SIZE, draw_shape

ROOT = Path(__file__).resolve().parents[1]

SMALL = {"shapes": (40, 10), "text": (40, 10), "charts": (40, 10), "video": (24, 8),  # (n_train, n_val)
         "scenes": (40, 10)}  # scenes: images, about ten question lines each
ANSWER = re.compile(r"^[a-z0-9]+( [a-z0-9]+)*$")  # short, lowercase, no punctuation


def script(name):
    return ROOT / "data" / name / "prepare.py"


def prepare_command(name, out, n_train, n_val, seed):
    """The command line that writes data/<name> into `out` (run it in the repo root)."""
    return [sys.executable, "-m", f"data.{name}.prepare", "--out", str(out), "--n_train", str(n_train),
            "--n_val", str(n_val), "--seed", str(seed)]


def run_prepare(name, base):
    """Run data/<name>/prepare.py three times: {a: seed 1, b: seed 1 again,
    c: seed 2}; return the three output folders."""
    n_train, n_val = SMALL[name]
    runs = {"a": 1, "b": 1, "c": 2}
    # all three at once
    procs = [subprocess.Popen(prepare_command(name, base / k, n_train, n_val, seed), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k, seed in runs.items()]
    for p in procs:
        _, err = p.communicate()
        assert p.returncode == 0, err.decode()
    return {k: base / k for k in runs}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """generated(name) -> output folders, each dataset generated once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = run_prepare(name, tmp_path_factory.mktemp(name))
        return cache[name]
    return get


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def load(folder, split):
    with open(folder / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def normalize(rec):
    """Both line forms -> (images, turns)."""
    if "image" in rec:
        return [rec["image"]], [{"prompt": rec["prompt"], "answer": rec["answer"]}]
    return rec["images"], rec["turns"]


# -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SMALL))
def test_deterministic(generated, name):
    d = generated(name)
    a, b, c = snapshot(d["a"]), snapshot(d["b"]), snapshot(d["c"])
    assert a == b, f"{name}: same seed gave different files"
    assert a["train.jsonl"] != c["train.jsonl"] and a["val.jsonl"] != c["val.jsonl"]
    assert a["train.jsonl"] != a["val.jsonl"]


@pytest.mark.parametrize("name", list(SMALL))
def test_format(generated, name):
    folder = generated(name)["a"]
    for split, n in zip(("train", "val"), SMALL[name]):
        records = load(folder, split)
        if name == "scenes":  # one line per question, about ten to an image
            assert len({r["image"] for r in records}) == n and 8 * n <= len(records) <= 10 * n
        else:
            assert len(records) == n
        for rec in records:
            assert isinstance(rec["task"], str) and rec["task"]
            images, turns = normalize(rec)
            assert images and turns
            n_markers = sum(t["prompt"].count(MARKER) for t in turns)
            assert n_markers == len(images) or (len(images) == 1 and n_markers == 0), rec
            for t in turns:
                assert isinstance(t["prompt"], str) and ANSWER.match(t["answer"]), t
            for path in images:
                assert not Path(path).is_absolute()
                with Image.open(folder / path) as img:
                    assert img.format == "PNG" and img.mode == "RGB" and img.size == (SIZE, SIZE)
            if name == "video":
                assert rec["fps"] > 0 and rec["task"] in ("video_caption", "video_memory")
            else:
                assert rec["task"] == name


def test_shapes_colour_is_in_image(generated):
    d = generated("shapes")
    for rec in load(d["a"], "train"):
        named = [w for w in rec["answer"].split() if w in COLORS]  # "red" or "a red circle"
        if rec["prompt"] == "what shape is this?":
            assert not named and rec["answer"] in SHAPES
            continue
        assert len(named) == 1, rec
        colour = COLORS[named[0]]
        pixels = np.array(Image.open(d["a"] / rec["image"])).reshape(-1, 3)
        assert (pixels == colour).all(-1).any(), rec


def scene_answer(question, objects):
    """The answer to a scenes question, worked out from the scene's objects, independently of
    data/scenes/prepare.py's question code."""
    words = question.rstrip("?").split()
    plural = {s + ("es" if s.endswith("s") else "s"): s for s in SHAPES}
    if question == "how many shapes are there?":
        return str(len(objects))
    if words[:2] == ["how", "many"]:
        return str(sum(o["shape"] == plural[words[2]] for o in objects))
    if words[:3] == ["what", "shape", "is"]:  # the <colour> object
        (o,) = [o for o in objects if o["color"] == words[4]]
        return o["shape"]
    if words[:3] == ["what", "color", "is"]:  # the <shape>: one of it
        (o,) = [o for o in objects if o["shape"] == words[4]]
        return o["color"]
    if words[:2] == ["is", "there"]:  # a red circle / a circle / a red shape
        color = next((w for w in words[3:] if w in COLORS), None)
        shape = next((w for w in words[3:] if w in SHAPES), None)
        return "yes" if any(color in (None, o["color"]) and shape in (None, o["shape"]) for o in objects) else "no"
    if words[:2] == ["is", "the"]:  # the <c1> shape left/right of the <c2> shape
        (a,) = [o for o in objects if o["color"] == words[2]]
        (b,) = [o for o in objects if o["color"] == words[7]]
        assert abs(a["x"] - b["x"]) >= 8  # asked only where the answer is plain to see
        return "yes" if (a["x"] < b["x"]) == (words[4] == "left") else "no"
    raise AssertionError(f"unknown question form: {question}")


def test_scenes_answers_match_objects_and_pixels(generated):
    folder = generated("scenes")["a"]
    records = load(folder, "train") + load(folder, "val")
    by_image = {}
    for rec in records:
        assert rec["answer"] == scene_answer(rec["prompt"], rec["objects"]), rec
        by_image.setdefault(rec["image"], []).append(rec)
    yes_no = sum(r["answer"] in ("yes", "no") for r in records) / len(records)
    yes = sum(r["answer"] == "yes" for r in records) / max(1, sum(r["answer"] in ("yes", "no") for r in records))
    assert 0.5 < yes_no < 0.8 and 0.35 < yes < 0.65  # mostly yes/no, as real sets; yes and no alike
    kinds = {" ".join(r["prompt"].split()[:2]) for r in records}
    assert kinds == {"is there", "what color", "what shape", "how many", "is the"}
    for path, recs in by_image.items():
        objects = recs[0]["objects"]
        assert all(r["objects"] == objects for r in recs) and 1 <= len(objects) <= 4
        assert len({r["prompt"] for r in recs}) == len(recs)  # no question twice about one image
        assert len({o["color"] for o in objects}) == len(objects)  # "the red shape" is one shape
        pixels = {tuple(p) for p in np.array(Image.open(folder / path)).reshape(-1, 3)}
        drawn = {name for name, rgb in COLORS.items() if rgb in pixels}
        assert drawn == {o["color"] for o in objects}, (path, drawn)  # every object drawn, no other colour


# -----------------------------------------------------------------------------
# video: check answers against the pixels of the frames

def video_module():
    spec = importlib.util.spec_from_file_location("video_prepare", script("video"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ink_crop(mask):
    ys, xs = np.nonzero(mask)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def describe_object(path, templates):
    """(colour, shape) of the one object in a video_memory frame."""
    a = np.array(Image.open(path))
    ink = (a != 255).any(-1)
    colours = {tuple(int(v) for v in px) for px in a[ink]}
    assert len(colours) == 1, colours
    colour = {rgb: n for n, rgb in COLORS.items()}[colours.pop()]
    crop = ink_crop(ink)
    shapes = [s for s, t in templates.items() if t.shape == crop.shape and (t == crop).all()]
    assert len(shapes) == 1
    return colour, shapes[0]


def test_video_answers_match_frames(generated):
    d = generated("video")
    mod = video_module()
    templates = {}
    for s in SHAPES:
        img = Image.new("L", (SIZE, SIZE), 0)
        draw_shape(ImageDraw.Draw(img), s, SIZE // 2, SIZE // 2, mod.R, 255)
        templates[s] = ink_crop(np.array(img) > 0)

    records = load(d["a"], "train") + load(d["a"], "val")
    tasks = [r["task"] for r in records]
    assert 0.2 < tasks.count("video_memory") / len(tasks) < 0.8  # roughly half each
    for rec in records:
        frames = [(d["a"] / p).read_bytes() for p in rec["images"]]
        answers = [t["answer"] for t in rec["turns"]]
        assert all(t["prompt"].startswith(MARKER) for t in rec["turns"])  # one frame per turn
        # the first prompt names the kind of clip (its first frame alone cannot), and only the first
        prompts = [t["prompt"] for t in rec["turns"]]
        assert prompts[0] == f"{MARKER} {mod.FIRST_PROMPTS[rec['task']]}", rec
        if rec["task"] == "video_caption":
            assert all(p == MARKER for p in prompts[1:])
            # the first comment names the objects in the order they are seen (left to right, or top
            # to bottom when one is above the other), read back from the first frame's pixels
            a = np.array(Image.open(d["a"] / rec["images"][0]))
            centres = []
            for n, rgb in COLORS.items():
                ys, xs = np.nonzero((a == rgb).all(-1))
                if len(xs):
                    centres.append(((xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2, n))
            if len(centres) == 2 and abs(centres[0][0] - centres[1][0]) <= mod.R:
                centres.sort(key=lambda c: c[1])
            else:
                centres.sort()
            named = [w for w in answers[0].split() if w in COLORS]
            assert named == [n for _, _, n in centres], rec
            for j in range(1, len(frames)):  # commentary says "nothing" exactly when nothing changed
                assert (frames[j] == frames[j - 1]) == (answers[j] == "nothing changes"), (rec, j)
        else:
            question = rec["turns"][-1]["prompt"]
            key = 0 if "color" in question else 1
            first = describe_object(d["a"] / rec["images"][0], templates)
            last = describe_object(d["a"] / rec["images"][-1], templates)
            assert answers[-1] == first[key] != last[key], rec
            # the earlier commentary never names a colour or shape
            assert all(p == MARKER for p in prompts[1:-1])
            words = set(" ".join(answers[:-1]).split())
            assert not words & (set(COLORS) | set(SHAPES)), rec


def test_train_jsonl_appears_last_and_whole(tmp_path):
    # train.py takes a folder holding train.jsonl as ready: while samples are still being made,
    # that file must not exist yet, and no temporary file may be left behind at the end
    from data.common import write_dataset
    seen = []

    def make_sample(rng, stem):
        seen.append((stem, (tmp_path / "train.jsonl").exists()))
        img = Image.new("RGB", (4, 4), (rng.randrange(256), 0, 0))
        return {"image": f"images/{stem}.png", "prompt": "q", "answer": "a"}, [(f"images/{stem}.png", img)]

    assert write_dataset("toy", make_sample, str(tmp_path), n_train=5, n_val=3, seed=1) == (8, 8)
    assert len(seen) == 8 and not any(exists for _, exists in seen)
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 5
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_failed_write_leaves_no_temporary_file(tmp_path):
    # a full disk in the middle of an image (after val.jsonl is done): the error goes on, and no
    # half-written image or jsonl is left behind under its temporary name
    from data.common import write_dataset

    class FullDisk:
        def save(self, path, format):
            with open(path, "wb") as f:
                f.write(b"half a png")
            raise OSError(28, "No space left on device")

    def make_sample(rng, stem):
        img = FullDisk() if stem == "train_00001" else Image.new("RGB", (4, 4))
        return {"image": f"images/{stem}.png", "prompt": "q", "answer": "a"}, [(f"images/{stem}.png", img)]

    with pytest.raises(OSError, match="No space left on device"):
        write_dataset("toy", make_sample, str(tmp_path), n_train=3, n_val=2, seed=1)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.*")) == [
        "images/train_00000.png", "images/val_00000.png", "images/val_00001.png", "val.jsonl"]


def test_two_preparers_at_once_write_what_one_writes(generated, tmp_path):
    # two runs started together on a fresh clone may both prepare the same dataset into one folder
    n_train, n_val = SMALL["shapes"]
    procs = [subprocess.Popen(prepare_command("shapes", tmp_path, n_train, n_val, 1), cwd=ROOT, stderr=subprocess.PIPE)
             for _ in range(2)]
    for p in procs:
        assert p.wait() == 0, p.stderr.read().decode()
    assert snapshot(tmp_path) == snapshot(generated("shapes")["a"])
