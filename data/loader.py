"""
data/loader.py: read a dataset folder, check it, tokenize it, serve batches.

The folder format (the one users bring their own data in):

    my_data/
        train.jsonl     one sample per line
        val.jsonl
        images/...      any layout; paths in the jsonl are relative to the folder and stay inside it

    {"images": ["images/a.png", ...], "turns": [{"prompt": "...", "answer": "..."}, ...], "task": "..."}
    {"image": "images/a.png", "prompt": "...", "answer": "...", "task": "..."}      (shorthand)

<|image|> markers in the prompts bind the images in order. A sample with one image and no marker
gets the marker at the start of its first prompt. "task" is optional (accuracy is reported per task
when a dataset has several); other keys are ignored. The files are UTF-8. Every problem is reported
as one DataError (a ValueError) naming the file, the line and the field.

Images are read by load_image: turned upright by their EXIF orientation, 16-bit and float images
scaled to [0, 1], transparent pixels composited on white, then resized to the model's image_size.

A sample's tokens are its turns one after the other, each `prompt <|answer|> answer <|endoftext|>`
(casa.encode_turn); the loss is on the answer tokens and their <|endoftext|> only. A sample longer
than the model's block_size is an error (not truncated: a cut answer would teach the model to stop
mid-word); train.py's default block_size=0 fits the longest sample.
"""

import io
import json
import os
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import casa

DATA_DIR = os.path.dirname(os.path.abspath(__file__))


class DataError(ValueError):
    """A problem with a dataset file; the message starts with file:line."""


@dataclass
class Sample:
    where: str  # "path/train.jsonl:12", for error messages
    images: list  # absolute image paths, in marker order
    turns: list  # [(prompt, answer)], markers in the prompts
    task: str = ""
    ids: list = field(default_factory=list)  # all turns' tokens
    answer_mask: list = field(default_factory=list)  # True where ids[i] is an answer token (loss)
    turns_at: list = field(default_factory=list)  # per turn (start, end of prompt incl. <|answer|>, end)


# -----------------------------------------------------------------------------
# Image files


BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, as most viewers show them


def load_image(source, image_size):
    """An image file (any size, mode or format) or a PIL image -> float tensor (3, image_size, image_size)
    in [0, 1], as the model expects: turned upright by its EXIF orientation (phone photos), converted
    to RGB by to_rgb() and resized. A missing file raises FileNotFoundError; a file that cannot be
    decoded (not an image, corrupt, truncated) or that is over Pillow's size guard (a "decompression
    bomb", its warning included) raises one ValueError naming the file."""
    from PIL import Image, ImageOps

    if isinstance(source, Image.Image):
        img = ImageOps.exif_transpose(source)
    else:
        try:
            with warnings.catch_warnings():  # Pillow only warns between 1x and 2x its pixel limit
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(source) as f:
                    f.load()  # decode it all now: a truncated file fails here, not later
                    img = ImageOps.exif_transpose(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"image file not found: {source}") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # not OSErrors
            raise ValueError(f"image {source} is too large to read: {str(e).rstrip('.')} (Pillow's guard against "
                             f"decompression bombs); shrink it first, the model sees it at {image_size}x{image_size} "
                             "pixels") from None
        except Exception as e:  # a decoder meeting a bad file may raise OSError, SyntaxError, EOFError, ...
            raise ValueError(f"cannot read image {source}: {e or type(e).__name__}") from None
    img = to_rgb(img).resize((image_size, image_size), Image.BICUBIC)
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(image_size, image_size, 3).permute(2, 0, 1).float() / 255.0


def to_rgb(img):
    """A PIL image of any mode -> 8-bit RGB, the colours a viewer shows. Pillow's convert("RGB") alone
    would clamp 16-bit and float values to 0..255 (a 16-bit photo turns white, a float one black) and
    drop transparency (keeping the colour hidden under it), so:
    - 16-bit integer images (modes I;16..., and I) are scaled by 1/65535; values outside clip to [0, 1];
    - float images (mode F) are taken to be in [0, 1] already; values outside (and NaN) clip to it;
    - transparent pixels (RGBA, LA, PA, or a P/L/RGB image with a transparent colour) are composited
      on BACKGROUND (white).
    Every other image (RGB, L, P, 1, CMYK, ...) converts as Pillow converts it."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        a = np.clip(np.nan_to_num(a if img.mode == "F" else a / 65535), 0.0, 1.0)
        img = Image.fromarray((a * 255).round().astype(np.uint8))  # mode L
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        background = Image.new("RGBA", img.size, BACKGROUND + (255,))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


# -----------------------------------------------------------------------------
# Finding a dataset


def resolve_dataset(name, data_dir=DATA_DIR, prepare=True):
    """A dataset name or path -> the folder holding train.jsonl and val.jsonl.
    A path (existing folder, or containing a slash) is used as it is. A name is a folder under data/;
    when its train.jsonl is missing and it has a prepare.py, that script is run to make it, as a
    module from the folder above data/ (python -m data.<name>.prepare), whatever the current folder."""
    import subprocess

    is_path = os.path.isdir(name) or os.sep in name or "/" in name
    folder = os.path.abspath(name) if is_path else os.path.join(data_dir, name)
    if os.path.exists(os.path.join(folder, "train.jsonl")):
        return folder
    if not is_path and prepare and os.path.exists(os.path.join(folder, "prepare.py")):
        root, package = os.path.split(os.path.abspath(data_dir))  # the repo root, "data"
        command = f"python -m {package}.{name}.prepare"
        print(f"dataset {name!r}: {folder}/train.jsonl not found, running {command}", flush=True)
        # from the repo root (and with it on PYTHONPATH), where casa, configurator and data/ import from
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        done = subprocess.run([sys.executable, "-m", f"{package}.{name}.prepare"], cwd=root, env=env)
        if done.returncode != 0:
            raise OSError(f"dataset {name!r}: `{command}` (in {root}) failed with exit code {done.returncode}; "
                          "its error is printed above")
        if os.path.exists(os.path.join(folder, "train.jsonl")):
            return folder
    known = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)) and not d.startswith(("_", ".")))
    raise FileNotFoundError(f"dataset {name!r}: no train.jsonl in {folder}. Give a folder holding train.jsonl "
                            f"and val.jsonl, or one of the built-in names: {', '.join(known)}")


# -----------------------------------------------------------------------------
# Reading and checking one split


def bind_images(prompts, n_images, where=""):
    """Check the <|image|> markers against the images; a single image with no marker goes at the
    start of the first prompt. Returns the prompts (a new list)."""
    prompts = list(prompts)
    n_markers = sum(p.count(casa.IMAGE) for p in prompts)
    if n_markers == 0 and n_images == 1:
        prompts[0] = casa.IMAGE + prompts[0]
    elif n_markers != n_images:
        hint = " (with several images, put one <|image|> marker per image in the prompts)" if n_markers == 0 else ""
        raise DataError(f"{where}{n_markers} <|image|> marker(s) in the prompts but {n_images} image(s){hint}")
    return prompts


def json_type(x):
    """The JSON name of a value's type, for error messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(x), type(x).__name__)


def parse_line(line, folder, where):
    """One jsonl line -> Sample (not tokenized). Raises DataError naming `where` and the field."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # a number of over 4300 digits, lists nested 1000 deep
        raise DataError(f"{where}: not valid JSON ({e or type(e).__name__})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {json_type(rec)}")

    def need_str(d, key, ctx=""):
        if key not in d:
            raise DataError(f"{where}: missing field {key!r}{ctx}")
        if not isinstance(d[key], str):
            raise DataError(f"{where}: field {key!r}{ctx} must be a string, got {json_type(d[key])}")
        return d[key]

    # turns
    if "turns" in rec:
        if "prompt" in rec or "answer" in rec:
            raise DataError(f"{where}: give either 'turns' or 'prompt'/'answer', not both")
        turns = rec["turns"]
        if not isinstance(turns, list) or not turns:
            got = "an empty list" if turns == [] else json_type(turns)
            raise DataError(f"{where}: field 'turns' must be a non-empty list of {{\"prompt\": ..., \"answer\": ...}}"
                            f" objects, got {got}")
        pairs = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise DataError(f"{where}: turn {i} must be an object with 'prompt' and 'answer', got {json_type(t)}")
            pairs.append((need_str(t, "prompt", f" in turn {i}"), need_str(t, "answer", f" in turn {i}")))
    elif "prompt" in rec or "answer" in rec:
        pairs = [(need_str(rec, "prompt"), need_str(rec, "answer"))]
    else:
        raise DataError(f"{where}: missing fields: need 'prompt' and 'answer' (or 'turns')")

    for i, (_, answer) in enumerate(pairs):
        if not answer.strip():  # nothing to learn or to match: a sign of a broken conversion
            where_turn = f" in turn {i}" if "turns" in rec else ""
            raise DataError(f"{where}: empty 'answer'{where_turn}; every turn needs an answer to train on")

    # images
    if "image" in rec and "images" in rec:
        raise DataError(f"{where}: give either 'image' or 'images', not both")
    if "image" in rec:
        images = [need_str(rec, "image")]
    else:
        images = rec.get("images", [])
        if not isinstance(images, list):
            raise DataError(f"{where}: field 'images' must be a list of paths (strings), got {json_type(images)}")
        for i, p in enumerate(images):
            if not isinstance(p, str):
                raise DataError(f"{where}: field 'images' item {i} must be a string (a path), got {json_type(p)}")
    paths = [image_path(folder, p, where) for p in images]

    task = rec.get("task", "")
    if not isinstance(task, str):
        raise DataError(f"{where}: field 'task' must be a string, got {json_type(task)}")
    prompts = bind_images([p for p, _ in pairs], len(paths), where=f"{where}: ")
    return Sample(where=where, images=paths, turns=list(zip(prompts, [a for _, a in pairs])), task=task)


def image_path(folder, path, where):
    """An image path of a jsonl line -> the file's full path. It must be relative to the dataset folder
    and stay inside it ("images/../a.png" does; "/a.png" and "../a.png" do not). The path is checked
    as written, not where it leads: a symlink inside the folder may point anywhere."""
    norm = os.path.normpath(path)
    if os.path.isabs(path) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        how = "is absolute" if os.path.isabs(path) else "leaves the dataset folder"
        raise DataError(f"{where}: image path {path!r} {how}; image paths are relative to the dataset folder "
                        f"({folder}) and stay inside it: copy or link the images into the folder")
    full = os.path.join(folder, path)
    if not os.path.isfile(full):
        raise DataError(f"{where}: image file not found: {path} (looked for {full})")
    return full


def read_lines(path):
    """[(line number, line)] of the non-blank lines of a jsonl file, read as UTF-8 (a leading byte-order
    mark is skipped). A byte that is not UTF-8 is a DataError naming its line and column."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}): "
                        "save the file as UTF-8") from None
    lines = io.StringIO(text, newline=None)  # \n, \r\n or \r ends a line, as in a file opened as text
    return [(lineno, line) for lineno, line in enumerate(lines, start=1) if line.strip()]


def read_split(folder, split):
    """All samples of folder/<split>.jsonl, checked. Blank lines are skipped."""
    path = os.path.join(folder, f"{split}.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (a dataset folder needs train.jsonl and val.jsonl)")
    samples = [parse_line(line, folder, f"{path}:{lineno}") for lineno, line in read_lines(path)]
    if not samples:
        raise DataError(f"{path}: no samples, the file is empty; write one JSON sample per line (data/README.md)")
    return samples


def typical_image_side(folder, split="train", n=100):
    """The median shorter side, in pixels, of the first n distinct images of a split (read from the
    file headers only: fast), or None when it has no images."""
    from PIL import Image

    path = os.path.join(folder, f"{split}.jsonl")
    seen, sides = set(), []
    for lineno, line in read_lines(path):
        if len(seen) >= n:
            break
        for image in parse_line(line, folder, f"{path}:{lineno}").images:
            if image in seen:
                continue
            seen.add(image)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    with Image.open(image) as img:
                        sides.append(min(img.size))
            except Exception:  # a broken or oversized file: the full read (Dataset) names its line
                pass
    return sorted(sides)[len(sides) // 2] if sides else None


def tokenize(sample, tokenizer):
    """Fill sample.ids / answer_mask / turns_at from its turns."""
    ids, mask, starts = [], [], []
    for prompt, answer in sample.turns:
        try:
            t, n_prompt = casa.encode_turn(tokenizer, prompt, answer)
        except ValueError as e:  # e.g. a literal <|answer|> or <|endoftext|> in a prompt
            raise DataError(f"{sample.where}: cannot tokenize the prompt {prompt!r}: {e}") from None
        starts.append((len(ids), len(ids) + n_prompt, len(ids) + len(t)))
        ids += t
        mask += [False] * n_prompt + [True] * (len(t) - n_prompt)
    sample.ids, sample.answer_mask, sample.turns_at = ids, mask, starts
    return sample


# -----------------------------------------------------------------------------
# The dataset: tokens and decoded images in memory, training batches, evaluation prompts


class Dataset:
    """One split in memory. Images are decoded once, at image_size, and kept as bytes (uint8, a
    quarter of float32: 40,000 64x64 images take 490 MB); a batch turns them into floats in [0, 1].
    blind=True: every image is replaced by a blank (zeros) one, the blind baseline."""

    def __init__(self, folder, split, image_size, blind=False, tokenizer=None):
        self.folder, self.split, self.image_size, self.blind = folder, split, image_size, blind
        self.tokenizer = tokenizer or casa.get_tokenizer()
        self.eot = self.tokenizer.encode(casa.ENDOFTEXT, allowed_special="all")[0]
        self.image_id = self.tokenizer.encode(casa.IMAGE, allowed_special="all")[0]
        self.samples = [tokenize(s, self.tokenizer) for s in read_split(folder, split)]
        self.tasks = sorted({s.task for s in self.samples})
        self.turn_kinds = turn_kinds(self.samples)  # per sample, per turn: "task: question kind"
        by_images = {}  # the samples that show the same images (the questions about one picture)
        keys = [tuple(s.images) if s.images else i for i, s in enumerate(self.samples)]  # text alone: a group of one
        for i, key in enumerate(keys):
            by_images.setdefault(key, []).append(i)
        self.same_images = [by_images[key] for key in keys]  # per sample, its group
        order = {key: j for j, key in enumerate(by_images)}
        self.picture = torch.tensor([order[key] for key in keys], dtype=torch.long)  # per sample, its group's number
        self._balanced_draw = (None, None, None)  # draw_groups': (weights, draw, keep_p)
        self.most_per_image = max(map(len, by_images.values()), default=0)
        self.per_image = len(self.samples) / max(1, len(by_images))  # samples a picture, on average
        self._images = {}  # path -> (3, S, S) uint8
        if not blind:  # decode everything now: errors early, batches fast
            for s in self.samples:
                self.sample_images(s)

    def __len__(self):
        return len(self.samples)

    def max_len(self):
        """Longest training input (ids minus the last token) of this split."""
        return max(len(s.ids) - 1 for s in self.samples)

    def max_answer_len(self):
        """Longest answer in tokens, its <|endoftext|> included."""
        return max(end - p for s in self.samples for (_, p, end) in s.turns_at)

    def check_block_size(self, block_size):
        for s in self.samples:
            if len(s.ids) - 1 > block_size:
                raise DataError(f"{s.where}: sample is {len(s.ids) - 1} tokens, longer than block_size="
                                f"{block_size}; train with --block_size={len(s.ids) - 1} or more (or 0: fit the data)")

    def sample_images(self, s):
        """(k, 3, S, S) float images of a sample in [0, 1] (zeros when blind)."""
        S = self.image_size
        if self.blind:
            return torch.zeros(len(s.images), 3, S, S)
        out = []
        for path in s.images:
            if path not in self._images:
                try:
                    img = load_image(path, S)
                except (OSError, ValueError) as e:
                    raise DataError(f"{s.where}: {e}") from None
                self._images[path] = (img * 255).round().to(torch.uint8)  # exact: load_image gives k/255
            out.append(self._images[path])
        return torch.stack(out).float() / 255 if out else torch.zeros(0, 3, S, S)

    def all_images(self):
        """Every image of the split once, (K, 3, S, S) uint8 (what vision pretraining draws from)."""
        S = self.image_size
        if not self._images:
            return torch.zeros(0, 3, S, S, dtype=torch.uint8)
        return torch.stack(list(self._images.values()))

    # --- training ---

    def batch(self, indices, images=True):
        """Samples -> idx (B, T), targets (B, T), images (M, 3, S, S) or None (also when images=False).
        idx is each sample's tokens but the last, right-padded with <|endoftext|>; targets the next
        token where it is an answer token, else -1 (prompts and padding carry no loss)."""
        rows = [self.samples[i] for i in indices]
        T = max(len(s.ids) - 1 for s in rows)
        idx = torch.full((len(rows), T), self.eot, dtype=torch.long)
        targets = torch.full((len(rows), T), -1, dtype=torch.long)
        for r, s in enumerate(rows):
            x, y = self._xy(s)
            idx[r, : len(x)], targets[r, : len(y)] = x, y
        if not images or not any(s.images for s in rows):
            return idx, targets, None
        if self.blind:
            return idx, targets, torch.zeros(sum(len(s.images) for s in rows), 3, self.image_size, self.image_size)
        return idx, targets, torch.stack([self._images[p] for s in rows for p in s.images]).float() / 255

    def _xy(self, s):
        """A sample's input ids and targets as tensors (made once, kept)."""
        if not hasattr(s, "xy"):
            ids = torch.tensor(s.ids)
            s.xy = ids[:-1], torch.where(torch.tensor(s.answer_mask[1:]), ids[1:], -1)
        return s.xy

    def draw_groups(self, batch_size, generator, weights=None, per_image=1):
        """The rows of a random batch (with replacement), drawn from `generator` (reproducible,
        resumable), as a list of groups, batch_size rows in all. per_image 1: samples drawn by
        `weights` (kind_weights(); None: all alike). Else each group is up to per_image questions about
        one picture (samples with the same images), none twice, each question as often in the long run
        as its weight says."""
        if per_image <= 1 or self.most_per_image == 1:  # one question per picture: a plain draw
            if weights is None:
                rows = torch.randint(len(self.samples), (batch_size,), generator=generator)
            else:
                rows = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
            return [[r] for r in rows.tolist()]
        if weights is None:  # every question as likely: a picture's questions, up to per_image of them
            draw, keep_p = torch.ones(len(self.samples), dtype=torch.float64), None
        else:  # kinds balanced although a picture's questions come together: a picture is drawn as
            # likely as its highest weight, then each of its questions kept with its weight over that
            # highest (so it is asked as often as its weight says; the highest is always kept)
            if self._balanced_draw[0] is not weights:  # worked out once for the weights of a run
                highest = torch.zeros(int(self.picture.max()) + 1, dtype=torch.float64).scatter_reduce(
                    0, self.picture, weights, "amax")[self.picture]  # (samples,)
                size = torch.bincount(self.picture)[self.picture]  # (samples,): its picture's questions
                self._balanced_draw = (weights, highest / size, weights / highest)
            _, draw, keep_p = self._balanced_draw
        groups, n = [], 0
        picks = iter(torch.multinomial(draw, batch_size, replacement=True, generator=generator).tolist())
        while n < batch_size:  # each group has a question at least, so batch_size picks are enough
            group = self.same_images[next(picks)]
            if keep_p is not None:
                keep = torch.rand(len(group), generator=generator, dtype=torch.float64) < keep_p[group]
                group = [i for i, kept in zip(group, keep.tolist()) if kept]
            k = min(per_image, batch_size - n, len(group))  # a random k of them, in a random order
            group = [group[j] for j in torch.randperm(len(group), generator=generator)[:k].tolist()]
            groups.append(group)
            n += len(group)
        return groups

    def get_batch(self, batch_size, generator, weights=None, per_image=1):
        """A random batch of draw_groups' rows. Drawn one question a picture (per_image 1, or a
        dataset of one question per picture): idx, targets, images (M, 3, S, S) or None (one image
        per marker, as batch() gives), None. Else every image is in the batch once: idx, targets,
        images (K, 3, S, S), image_index (M,) (marker m of idx shows images[image_index[m]]), so the
        model encodes a picture once for all its questions."""
        return self.batch_of_groups(self.draw_groups(batch_size, generator, weights, per_image))

    def batch_of_groups(self, groups):
        """The batch of draw_groups' groups, as get_batch returns it (train.py draws the groups itself:
        it keeps their rows to score each question kind)."""
        batch_size = sum(len(group) for group in groups)
        rows = [r for group in groups for r in group]
        if len(groups) == batch_size:  # one question per picture drawn
            return (*self.batch(rows), None)
        idx, targets, _ = self.batch(rows, images=False)
        paths = [p for i in rows for p in self.samples[i].images]
        if not paths:
            return idx, targets, None, None
        slot = {p: j for j, p in enumerate(dict.fromkeys(paths))}  # each image once, in order of first use
        image_index = torch.tensor([slot[p] for p in paths], dtype=torch.long)
        S = self.image_size
        if self.blind:
            return idx, targets, torch.zeros(len(slot), 3, S, S), image_index
        return idx, targets, torch.stack([self._images[p] for p in slot]).float() / 255, image_index

    def kind_weights(self):
        """A weight per sample that makes every question kind (turn_kinds) as likely as every other
        in a batch: a sample weighs the mean over its turns of 1 / (how many turns have that kind).
        Exact when each sample asks one question (VQA sets); a sample of several kinds counts for each."""
        counts = {}
        for kinds in self.turn_kinds:
            for k in kinds:
                counts[k] = counts.get(k, 0) + 1
        return torch.tensor([sum(1 / counts[k] for k in kinds) / len(kinds) for kinds in self.turn_kinds],
                            dtype=torch.float64)

    def iter_batches(self, batch_size, limit=None):
        """The split in order, in batches (for validation loss)."""
        n = len(self.samples) if limit is None else min(limit, len(self.samples))
        for i in range(0, n, batch_size):
            yield self.batch(range(i, min(i + batch_size, n)))

    # --- evaluation ---

    def eval_items(self, limit=None):
        """One item per turn, in order: dict(ids=prompt ids up to and including <|answer|> (the
        earlier turns with their true answers before it), images=(k, 3, S, S) of the markers in
        those ids, truth=answer string, task, sample=index, turn=index, prompt=the turn's prompt).
        limit: at most this many items."""
        items = []
        for si, s in enumerate(self.samples):
            imgs = self.sample_images(s)
            for ti, ((prompt, answer), (_, end, _)) in enumerate(zip(s.turns, s.turns_at)):
                ids = s.ids[:end]
                k = ids.count(self.image_id)
                items.append(dict(ids=ids, images=imgs[:k], truth=answer, task=s.task, sample=si, turn=ti,
                                  prompt=prompt))
                if limit is not None and len(items) >= limit:
                    return items
        return items


# -----------------------------------------------------------------------------
# Scoring: exact match in one forward pass, per question kind, with and without the right images

MAX_KINDS = 12  # more distinct questions than this in a task: group them by their first two words


def question_kind(prompt):
    """What a prompt asks, for per-question accuracy: the prompt without its <|image|> markers,
    numbers and single letters blanked ("what is the value of bar _?"). A turn whose prompt is just
    a marker (a video frame) has the kind ""."""
    text = prompt.replace(casa.IMAGE, " ").strip().lower()
    text = re.sub(r"\b([a-z]|\d+)\b", "_", text)
    return " ".join(text.split())


def turn_kinds(samples):
    """Per sample, per turn: "task: kind" (or just the task, or just the kind). A task with more than
    MAX_KINDS distinct questions (free-form VQA) is grouped by the first two words instead."""
    kinds = {}
    for s in samples:
        kinds.setdefault(s.task, set()).update(question_kind(p) for p, _ in s.turns)
    short = {task for task, ks in kinds.items() if len(ks) > MAX_KINDS}
    out = []
    for s in samples:
        labels = []
        for prompt, _ in s.turns:
            kind = question_kind(prompt)
            if s.task in short:
                kind = " ".join(kind.split()[:2])
            labels.append(": ".join(x for x in (s.task, kind) if x) or "all")
        out.append(labels)
    return out


class KindErrors:
    """Each question kind's running error rate on training batches (train.py's --focus_errors), and
    the draw that follows it, so the kinds a model already answers give way to those it does not: a
    kind comes as often as 0.1 + its rate, or with hardest (--focus_hardest) the kind furthest from
    learned, each judged against its own answer prior, comes most (factors()). Either way one never
    answered draws at most 11 times as often as one always answered. rates: a resumed run's, else 1.0
    (all wrong)."""

    def __init__(self, dataset, rates=None, hardest=False):
        self.hardest = hardest
        self.kinds = sorted({k for ks in dataset.turn_kinds for k in ks})
        index = {k: j for j, k in enumerate(self.kinds)}
        # one entry per turn: its sample, its kind, 1 / its sample's turns (kind_weights counts alike)
        turns = [(i, index[k], 1 / len(ks)) for i, ks in enumerate(dataset.turn_kinds) for k in ks]
        self.sample = torch.tensor([t[0] for t in turns], dtype=torch.long)  # (E,)
        self.kind = torch.tensor([t[1] for t in turns], dtype=torch.long)  # (E,)
        self.share = torch.tensor([t[2] for t in turns], dtype=torch.float64)  # (E,)
        self.n_samples = len(dataset.samples)
        fits = (isinstance(rates, list) and len(rates) == len(self.kinds)
                and all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rates))
        self.rates = torch.tensor(rates if fits else [1.0] * len(self.kinds), dtype=torch.float64).clamp(0, 1)
        # each kind's error when it is always given its most common training answer: the answer prior's
        answers = {k: Counter() for k in self.kinds}
        for s, ks in zip(dataset.samples, dataset.turn_kinds):
            for (_, a), k in zip(s.turns, ks):
                answers[k][a] += 1
        self.prior_error = torch.tensor([1 - max(c.values()) / sum(c.values()) for c in answers.values()],
                                        dtype=torch.float64)  # (kinds,)

    def record(self, rows, right):
        """rows: the batch's sample indices; right (B,) bool: each row answered right. Each question
        moves its kind's rate about 1% of the way to its own outcome (a sample drawn twice counts once)."""
        row_of = {r: j for j, r in enumerate(rows)}
        at = torch.isin(self.sample, torch.tensor(rows, dtype=torch.long))  # the turns of the drawn samples
        row = torch.tensor([row_of[i] for i in self.sample[at].tolist()], dtype=torch.long)  # each turn's row
        wrong_turn = 1 - right.double().cpu()[row]
        kind, share = self.kind[at], self.share[at]
        n = torch.zeros(len(self.kinds), dtype=torch.float64).index_add_(0, kind, share)
        wrong = torch.zeros(len(self.kinds), dtype=torch.float64).index_add_(0, kind, share * wrong_turn)
        seen = n > 0
        self.rates[seen] += (1 - 0.99 ** n[seen]) * (wrong[seen] / n[seen] - self.rates[seen])

    def factors(self):
        """Each kind's draw factor, (kinds,). hardest: a kind's standing is its error rate over its
        prior's (1: no better than always giving its most common answer, 0: all right; the prior's
        error floored at 0.05), and it draws 0.1 + exp(-(how far it stands ahead of the hardest kind)
        / 0.3): the hardest 1.1, one 0.3 ahead of it 0.47, 0.6 ahead 0.24. So a yes/no kind stuck at
        chance comes before a five-way kind that is half learned although its error rate is lower,
        and every kind alike while all are at their prior (/ 0.1, sharper, made related kinds take
        turns: docs/recipe.md). Else 0.1 + its error rate."""
        if not self.hardest:
            return 0.1 + self.rates
        standing = (self.rates / self.prior_error.clamp(min=0.05)).clamp(0, 1)
        return 0.1 + torch.exp((standing - standing.max()) / 0.3)

    def weights(self, equal_weights):
        """Sample weights for the draw: equal_weights (kind_weights: every kind alike) times each
        sample's factor, its kind's (a sample of several turns: the mean over them)."""
        factor = torch.zeros(self.n_samples, dtype=torch.float64).index_add_(
            0, self.sample, self.share * self.factors()[self.kind])  # (samples,)
        return equal_weights * factor

    def shares(self):
        """Each kind's expected share of a batch under weights(), as a dict."""
        w = self.factors()
        return {k: round(float(x), 3) for k, x in zip(self.kinds, w / w.sum())}


def shuffle_images(images, generator):
    """images (M, ...) reordered so that none stays where it was (M > 1): one random cycle."""
    perm = torch.randperm(images.size(0), generator=generator)  # position perm[i] gets image perm[i+1]
    return images[perm.roll(-1)[torch.argsort(perm)]]


def shift_images(images, max_shift, generator, same=False):
    """Training augmentation: each image (M, 3, S, S) moved by a random whole number of pixels, up to
    max_shift each way, its edge pixels repeated into the gap (no object is copied in, as mirroring
    would); same: all images by one shift (the frames of one clip, so motion stays as it was).
    Small datasets are memorised, not learned, without it (docs/recipe.md)."""
    p, S = max_shift, images.size(-1)
    if p == 0:
        return images
    padded = F.pad(images, (p, p, p, p), mode="replicate")  # (M, 3, S + 2p, S + 2p)
    d = torch.randint(2 * p + 1, (1 if same else len(images), 2), generator=generator).tolist()
    if same:
        d = d * len(images)
    return torch.stack([img[:, dy : dy + S, dx : dx + S] for img, (dy, dx) in zip(padded, d)])


@torch.no_grad()
def score(model, data, batch_size, limit=None, shuffle=False, device="cpu", autocast=None, per_token=False):
    """Exact match and loss of every answer of the first `limit` samples of `data`, in one forward
    pass per batch (teacher forcing). An answer counts as right when each of its tokens and its
    <|endoftext|> is the model's top choice given the true text before it: exactly the answers that
    greedy decoding (answer(), sample.py) reproduces, found without generating.
    shuffle: give every <|image|> marker another image of its batch (the image-use check: a model
    that ignores its images scores the same with them shuffled).
    per_token: each answer's value is then the list of its tokens' rights (the answer's tokens, then
    <|endoftext|>), to see which part of an answer is wrong.
    Returns (mean loss per answer token, {(sample index, turn index): right})."""
    import contextlib

    autocast = autocast or contextlib.nullcontext()
    n = len(data) if limit is None else min(limit, len(data))
    gen = torch.Generator().manual_seed(0)  # the same shuffle at every evaluation
    loss_sum, n_tok, right = 0.0, 0, {}
    for start in range(0, n, batch_size):
        rows = list(range(start, min(start + batch_size, n)))
        idx, targets, images = data.batch(rows)
        if shuffle and images is not None and images.size(0) > 1:
            images = shuffle_images(images, gen)
        idx, targets = idx.to(device), targets.to(device)
        with autocast:
            logits, loss = model(idx, None if images is None else images.to(device), targets)
        has = targets != -1
        loss_sum, n_tok = loss_sum + loss.item() * int(has.sum()), n_tok + int(has.sum())
        ok = ((logits.argmax(-1) == targets) | ~has).cpu()
        for r, i in enumerate(rows):
            for t, (_, p, end) in enumerate(data.samples[i].turns_at):
                tokens = ok[r, p - 1 : end - 1]  # the targets of ids[p:end]
                right[i, t] = tokens.tolist() if per_token else bool(tokens.all())
    return loss_sum / max(n_tok, 1), right


def eval_batches(items, batch_size):
    """Group eval items of equal prompt length into batches: no padding, so each row decodes as it
    would alone (up to float rounding). Yields (idx (B, T), images or None, items)."""
    by_len = {}
    for it in items:
        by_len.setdefault(len(it["ids"]), []).append(it)
    for T in sorted(by_len):
        group = by_len[T]
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            idx = torch.tensor([it["ids"] for it in chunk], dtype=torch.long)
            imgs = [it["images"] for it in chunk if len(it["images"])]
            yield idx, (torch.cat(imgs) if imgs else None), chunk


@torch.no_grad()
def answer(model, idx, images, tokenizer, max_new_tokens, temperature=0.0, top_k=None):
    """Generate answers for a batch of prompts (each ending with <|answer|>); returns strings, cut
    at <|endoftext|>."""
    eot = tokenizer.encode(casa.ENDOFTEXT, allowed_special="all")[0]
    out = model.generate(idx, images, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         stop_token=eot)
    texts = []
    for row in out[:, idx.size(1) :].tolist():
        if eot in row:
            row = row[: row.index(eot)]
        texts.append(tokenizer.decode(row))
    return texts


def text_tokens(targets):
    """Text tokens in a training batch, padding left out: each row ends with its last target."""
    has = targets != -1
    last = torch.where(has.any(1), targets.size(1) - has.flip(1).int().argmax(1), 0)
    return int(last.sum())
