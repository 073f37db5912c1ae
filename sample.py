"""
Ask a trained model about images.

    python sample.py                                   # 8 validation samples of the checkpoint's dataset
    python sample.py --image=photo.jpg --prompt="what color is the shape?"
    python sample.py --image=a.png,b.png --prompt="<|image|> then <|image|>: what changed?"
    python sample.py --grid=samples.png                # also a picture: images, truth, prediction
    python sample.py --temperature=0.8 --top_k=5 --num_samples=4 --image=photo.jpg

Settings are --name=value, as in train.py. temperature=0 (the default) is greedy decoding, which is
what train.py's accuracy measures; with --image, a temperature above 0 draws num_samples answers.
A bad setting, file or checkpoint ends the script with one line that says what is wrong.
"""

import math
import os
import random
import sys

import torch
from PIL import Image, ImageDraw, ImageFont

import casa
import configurator
from data.loader import Dataset, answer, bind_images, eval_batches, load_image, resolve_dataset

# -----------------------------------------------------------------------------
ckpt = "out/ckpt.pt"
image = ""  # an image file (any size or mode), or a comma list of them; empty: validation samples
prompt = "describe the image."  # with --image; a single image with no <|image|> marker goes first
num_samples = 8  # validation samples shown, or answers drawn for --image (temperature > 0)
temperature = 0.0  # 0: greedy
top_k = 0  # 0: off
seed = 1337
max_new_tokens = 32
grid = ""  # write a picture of the samples here (e.g. samples.png)
dataset = ""  # validation samples from this dataset instead of the checkpoint's
split = "val"
device = "auto"
threads = 0  # CPU threads for torch; 0: the cores that are idle now (casa.pick_threads)
# -----------------------------------------------------------------------------
configurator.apply(globals())


def fail(message):
    """End the script with one line that says what is wrong (never a traceback)."""
    sys.exit("error: " + " ".join(str(message).split()))  # one line, even for torch's multi-line messages


# the settings' ranges, checked before any work
for name, ok, rule in [("num_samples", num_samples >= 1, "at least 1"),
                       ("temperature", 0 <= temperature < math.inf, "0 (greedy) or more"),
                       ("top_k", top_k >= 0, "0 (off) or more"),
                       ("max_new_tokens", max_new_tokens >= 1, "at least 1"),
                       ("seed", seed >= 0, "0 or more"),
                       ("threads", threads >= 0, "0 (the idle cores) or more")]:
    if not ok:
        fail(f"--{name} must be {rule}, got {globals()[name]!r}")
for special in (casa.ANSWER, casa.ENDOFTEXT):
    if special in prompt:
        fail(f"--prompt contains {special}, which the model writes itself: give the question alone")
if grid and os.path.splitext(grid)[1].lower() not in Image.registered_extensions():
    fail(f"--grid={grid} is not a picture file name: give one like samples.png")
try:
    device = casa.pick_device(device)
except ValueError as e:
    fail(e)
n_threads, why = casa.pick_threads(threads)
torch.set_num_threads(n_threads)
torch.manual_seed(seed)
try:
    model, ck = casa.load_checkpoint(ckpt, device=device)
except (OSError, ValueError) as e:  # no such file, not a checkpoint
    fail(e)
except RuntimeError as e:  # weights that do not fit its config (load_state_dict's message may be long)
    text = str(e)[:300]
    fail(text if ckpt in text else f"cannot load {ckpt}: {text}")
model.eval()
config = model.config
train_args = ck.get("train_args") if isinstance(ck.get("train_args"), dict) else {}
blind = bool(train_args.get("blind", False))
tokenizer = casa.get_tokenizer()
S = config.image_size
print(f"{ckpt}: {config.variant}, step {ck.get('step', '?')}{', BLIND (images blanked)' if blind else ''}; "
      f"{device}, {n_threads} CPU thread(s) ({why})")

# -----------------------------------------------------------------------------
# what to ask: rows of (images (k, 3, S, S), prompt ids, prompt text, truth or None)
rows = []
if image:
    paths = [p for p in image.split(",") if p]
    if not paths:
        fail(f"--image={image!r} names no file: give an image file, or a comma list of them")
    try:
        imgs = torch.stack([load_image(p, S) for p in paths])
        prompts = bind_images([prompt], len(paths), where="--prompt/--image: ")
    except (OSError, ValueError) as e:  # no such file, not an image, truncated; markers that do not match
        fail(e)
    if blind:
        imgs = torch.zeros_like(imgs)
    ids, _ = casa.encode_turn(tokenizer, prompts[0])
    n = num_samples if temperature > 0 else 1
    rows = [dict(images=imgs, ids=ids, prompt=prompts[0], truth=None) for _ in range(n)]
else:
    try:
        if dataset:
            folder = resolve_dataset(dataset)
        else:
            folder = ck.get("dataset_dir") or ""
            if not os.path.exists(os.path.join(folder, f"{split}.jsonl")):  # moved: try the name under data/
                folder = resolve_dataset(train_args.get("dataset", "shapes"))
        data = Dataset(folder, split, S, blind=blind)
    except (OSError, ValueError) as e:  # no such dataset or split, an empty split, a bad line or image
        fail(e)
    items = data.eval_items()
    rows = random.Random(seed).sample(items, min(num_samples, len(items)))
    print(f"{len(rows)} of {len(items)} {split} answers of {folder}")

# -----------------------------------------------------------------------------
# answer them, batched by prompt length
preds = {}
for idx, imgs, chunk in eval_batches(rows, batch_size=64):
    if idx.size(1) > config.block_size:
        fail(f"the prompt is {idx.size(1)} tokens, longer than the model's block_size={config.block_size}")
    out = answer(model, idx.to(device), None if imgs is None else imgs.to(device), tokenizer, max_new_tokens,
                 temperature=temperature, top_k=top_k or None)
    for it, text in zip(chunk, out):
        preds[id(it)] = text
right = 0
for i, it in enumerate(rows):
    pred = preds[id(it)]
    shown = it["prompt"].replace(casa.IMAGE, "<img>")
    if it["truth"] is None:
        print(f"[{i}] {shown!r} -> {pred!r}")
    else:
        ok = pred.strip() == it["truth"].strip()
        right += ok
        print(f"[{'ok ' if ok else 'BAD'}] {shown!r} truth={it['truth']!r} pred={pred!r}")
if not image:
    print(f"exact match: {right}/{len(rows)}")


# the picture: each sample's images (as the model sees them, upscaled), its text below
def draw_grid(cells, path, cell=160, cols=4):
    """cells: [(images [(3, S, S) tensors], [(text, colour)])] -> a PNG, `cols` cells a row: each
    cell's images side by side, its text below, wrapped to the cell's width in pixels."""
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    width = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength

    def wrap(text):  # whole words while they fit; a word wider than the cell is cut where it must be
        lines = []
        for word in text.split():
            if lines and width(lines[-1] + " " + word, font=font) <= cell:
                lines[-1] += " " + word
                continue
            lines.append(word)
            while width(lines[-1], font=font) > cell:
                cut = max((i for i in range(1, len(lines[-1])) if width(lines[-1][:i], font=font) <= cell), default=1)
                lines[-1:] = [lines[-1][:cut], lines[-1][cut:]]
        return lines

    cells = [(pics, [(piece, color) for text, color in lines for piece in wrap(text)]) for pics, lines in cells]
    line_h, cols = 16, min(cols, len(cells))
    text_h = line_h * max(len(lines) for _, lines in cells) + 8
    n_rows = (len(cells) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * (cell + 10) + 10, n_rows * (cell + text_h + 10) + 10), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (pics, lines) in enumerate(cells):
        x0, y0 = 10 + (i % cols) * (cell + 10), 10 + (i // cols) * (cell + text_h + 10)
        side = cell // max(1, len(pics))
        if not pics:
            draw.text((x0 + 4, y0 + cell // 2), "(no image)", fill=(120, 120, 120), font=font)
        for j, pic in enumerate(pics):  # (3, S, S) in [0, 1] -> an RGB picture
            pixels = (pic.permute(1, 2, 0) * 255).round().byte().contiguous().numpy().tobytes()
            rgb = Image.frombytes("RGB", (pic.size(-1), pic.size(-1)), pixels)
            canvas.paste(rgb.resize((side, side), Image.NEAREST), (x0 + j * side, y0 + (cell - side) // 2))
        for k, (text, color) in enumerate(lines):
            draw.text((x0, y0 + cell + 4 + k * line_h), text, fill=color, font=font)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        canvas.save(path)
    except (OSError, ValueError) as e:  # a file where the folder should be, no permission, a full disk
        fail(f"cannot write --grid={path}: {e}")


if grid:
    cells = []
    for it in rows:
        pred = preds[id(it)]
        lines = [("Q: " + it["prompt"].replace(casa.IMAGE, "<img>"), (0, 0, 0))]
        if it["truth"] is not None:
            ok = pred.strip() == it["truth"].strip()
            lines += [("truth: " + it["truth"], (0, 0, 0)), ("pred: " + pred, (0, 140, 0) if ok else (200, 0, 0))]
        else:
            lines += [("answer: " + pred, (0, 0, 160))]
        cells.append((list(it["images"]), lines))
    draw_grid(cells, grid)
    print(f"wrote {grid} ({len(cells)} samples)")
