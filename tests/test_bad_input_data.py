"""
Bad input data, in process and fast. Each case writes one thing into a tiny dataset folder (a jsonl
line, an empty file, a broken image) and expects one DataError (a ValueError: what train.py,
sample.py and stream.py print as one `error:` line) that names the file, the line and the field and
says how to fix it. Then the image conversions (EXIF orientation, 16-bit, float, transparency,
Pillow's size guard) against references built here with numpy, and the prepare scripts' settings.
"""

import io
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from data.common import prepare
from data.loader import BACKGROUND, DataError, Dataset, load_image, typical_image_side

torch.set_num_threads(1)
S = 16
GOOD = {"image": "images/a.png", "prompt": "what color?", "answer": "red"}


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def dataset(folder, train, val=(GOOD,)):
    """A dataset folder: images/a.png (and a few broken images), train.jsonl and val.jsonl holding
    `train` and `val` (dicts written as JSON, str and bytes as they are, one a line)."""
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (20, 20), (255, 0, 0)).save(folder / "images" / "a.png")
    noise = np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    full = png_bytes(Image.fromarray(noise))
    (folder / "images" / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "images" / "empty.png").write_bytes(b"")
    (folder / "images" / "text.png").write_bytes(b"not an image")
    for split, lines in (("train", train), ("val", val)):
        data = b""
        for line in lines:
            line = json.dumps(line) if isinstance(line, dict) else line
            data += (line if isinstance(line, bytes) else line.encode()) + b"\n"
        (folder / f"{split}.jsonl").write_bytes(data)
    return folder


def assert_near(x, want, atol=0.0):
    """Every value of x within atol of want's (plain, without torch.testing's slow first import)."""
    want = torch.as_tensor(want, dtype=x.dtype)
    assert x.shape == want.shape and float((x - want).abs().max()) <= atol + 1e-6, (x, want)


def load_error(folder, split="train"):
    with pytest.raises(DataError) as e:
        Dataset(str(folder), split, S)
    return str(e.value)


# -----------------------------------------------------------------------------
# a bad line: one error naming file, line and field

LINE_ERRORS = [  # (what line 2 of train.jsonl holds, what the error says after "train.jsonl:2: ")
    (b'{"image": "images/a.png", "prompt": "caf\xe9?", "answer": "x"}',
     "not UTF-8 text (byte 0xe9 at column 41): save the file as UTF-8"),
    ('{"image": "images/a.png", "prompt": "q", "answer": "x"', "not valid JSON"),
    ('{"prompt": "q", "answer": ' + "1" * 5000 + "}", "not valid JSON"),  # over Python's int digits limit
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),  # deeper than json can nest
    ('"a string"', "expected a JSON object, got a string"),
    ({"image": "images/a.png", "prompt": 3, "answer": "x"}, "field 'prompt' must be a string, got a number"),
    ({"image": "images/a.png", "prompt": "q", "answer": ["x"]}, "field 'answer' must be a string, got a list"),
    ({"image": ["images/a.png"], "prompt": "q", "answer": "x"}, "field 'image' must be a string, got a list"),
    ({"images": "images/a.png", "prompt": "q", "answer": "x"},
     "field 'images' must be a list of paths (strings), got a string"),
    ({"images": ["images/a.png", 7], "prompt": "<|image|><|image|>", "answer": "x"},
     "field 'images' item 1 must be a string (a path), got a number"),
    ({"images": [], "turns": {"prompt": "q", "answer": "x"}}, "field 'turns' must be a non-empty list"),
    ({"images": [], "turns": []}, "got an empty list"),
    ({"turns": ["q"]}, "turn 0 must be an object with 'prompt' and 'answer', got a string"),
    ({"turns": [{"prompt": None, "answer": "x"}]}, "field 'prompt' in turn 0 must be a string, got null"),
    ({"image": "images/a.png", "prompt": "q", "answer": "x", "task": 5}, "field 'task' must be a string, got a number"),
    ({"image": "/tmp/a.png", "prompt": "q", "answer": "x"},
     "image path '/tmp/a.png' is absolute; image paths are relative to the dataset folder"),
    ({"image": "../a.png", "prompt": "q", "answer": "x"}, "image path '../a.png' leaves the dataset folder"),
    ({"images": ["images/a.png", "../a.png"], "prompt": "<|image|><|image|>", "answer": "x"},
     ") and stay inside it: copy or link the images into the folder"),
    ({"image": "images/../../ds/images/a.png", "prompt": "q", "answer": "x"}, "leaves the dataset folder"),
    ({"image": "..", "prompt": "q", "answer": "x"}, "leaves the dataset folder"),
    ({"image": "images/b.png", "prompt": "q", "answer": "x"}, "image file not found: images/b.png"),
    ({"image": "images/truncated.png", "prompt": "q", "answer": "x"}, "truncated.png: image file is truncated"),
    ({"image": "images/empty.png", "prompt": "q", "answer": "x"}, "cannot read image"),
    ({"image": "images/text.png", "prompt": "q", "answer": "x"}, "cannot read image"),
]


@pytest.mark.parametrize("line, message", LINE_ERRORS, ids=range(len(LINE_ERRORS)))
def test_bad_line_names_file_line_and_field(tmp_path, line, message):
    folder = dataset(tmp_path / "ds", [GOOD, line, GOOD])
    msg = load_error(folder)
    assert msg.startswith(f"{folder / 'train.jsonl'}:2: ") and message in msg, msg
    assert "\n" not in msg


def test_not_utf8_is_named_before_the_images_are_read(tmp_path):
    # train.py reads the image sizes (typical_image_side) first: it reports the same line; so does val
    folder = dataset(tmp_path / "ds", [GOOD, GOOD, b'{"prompt": "\xff", "answer": "x"}'], [b"\xc3("])
    want = f"{folder / 'train.jsonl'}:3: not UTF-8 text (byte 0xff at column 13)"
    with pytest.raises(DataError, match=want.replace("(", r"\(").replace(")", r"\)")):
        typical_image_side(str(folder))
    assert load_error(folder).startswith(want)
    assert load_error(folder, "val").startswith(f"{folder / 'val.jsonl'}:1: not UTF-8 text (byte 0xc3 at column 1)")


@pytest.mark.parametrize("train, val, bad", [([], [GOOD], "train"), (["", "  "], [GOOD], "train"), ([GOOD], [], "val")])
def test_empty_split_is_one_error(tmp_path, train, val, bad):
    folder = dataset(tmp_path / "ds", train, val)
    msg = load_error(folder, bad)
    assert msg == f"{folder / (bad + '.jsonl')}: no samples, the file is empty; write one JSON sample per line " \
                  "(data/README.md)"


def test_valid_input_still_loads(tmp_path):
    # no task, a byte-order mark, Windows line ends, a path that stays inside through "..", a
    # non-ASCII prompt, and a symlink inside the folder to images kept elsewhere: all fine
    elsewhere = tmp_path / "photos"
    elsewhere.mkdir()
    Image.new("RGB", (20, 20), (0, 0, 255)).save(elsewhere / "b.png")
    folder = dataset(tmp_path / "ds", [])
    os.symlink(elsewhere, folder / "linked")
    lines = [GOOD, {"image": "images/../images/a.png", "prompt": "café?", "answer": "rouge"},
             {"image": "linked/b.png", "prompt": "q", "answer": "blue", "task": "linked"}]
    text = "\ufeff" + "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in lines)
    (folder / "train.jsonl").write_bytes(text.encode("utf-8"))
    ds = Dataset(str(folder), "train", S)
    assert [s.task for s in ds.samples] == ["", "", "linked"]
    assert [s.where.rsplit(":", 1)[1] for s in ds.samples] == ["1", "2", "3"]
    assert ds.samples[1].turns[0][0].endswith("café?")
    assert_near(ds.sample_images(ds.samples[2])[0, :, 0, 0], torch.tensor([0.0, 0.0, 1.0]))


# -----------------------------------------------------------------------------
# images converted right: references built here


def loaded(img, tmp_path, fmt="PNG", **save):
    """img saved as fmt and read back by load_image at its own size (S x S: the resize keeps it)."""
    assert img.size == (S, S)
    path = tmp_path / f"img.{fmt.lower()}"
    img.save(path, fmt, **save)
    return load_image(str(path), S)


def as_rgb(gray):
    """(S, S) values in [0, 1] -> (3, S, S), as the model gets a gray image."""
    return torch.from_numpy(np.asarray(gray, dtype=np.float32)).expand(3, S, S)


def test_16_bit_scaled_by_65535(tmp_path):
    a = np.random.RandomState(0).randint(0, 65536, (S, S)).astype(np.uint16)
    a[0, :3] = 0, 32768, 65535
    # mode I;16 (a 16-bit PNG), and I (32-bit integers, as some TIFFs and older Pillows give 16-bit PNGs)
    for x in (loaded(Image.fromarray(a), tmp_path), load_image(Image.fromarray(a.astype(np.int32)), S)):
        assert_near(x, as_rgb(a / 65535), 1 / 255)
        assert x[:, 0, 0].tolist() == [0.0] * 3 and x[:, 0, 2].tolist() == [1.0] * 3
        assert abs(float(x[0, 0, 1]) - 0.5) <= 1 / 255  # Pillow's 8-bit clamp made this white


def test_float_taken_as_0_to_1_and_clipped(tmp_path):
    a = np.random.RandomState(1).uniform(-0.5, 1.5, (S, S)).astype(np.float32)
    a[0, :2] = 0.25, np.nan
    x = loaded(Image.fromarray(a), tmp_path, "TIFF")
    assert_near(x, as_rgb(np.nan_to_num(a.clip(0, 1))), 1 / 255)
    assert abs(float(x[0, 0, 0]) - 0.25) <= 1 / 255  # Pillow's 8-bit clamp made this black


def composited(rgb, alpha):
    """The independent reference: colour * alpha + background * (1 - alpha), in [0, 1]."""
    a = np.asarray(alpha, dtype=np.float64)[..., None] / 255
    out = np.asarray(rgb, dtype=np.float64) * a + np.array(BACKGROUND) * (1 - a)
    return torch.from_numpy(out / 255).permute(2, 0, 1).float()


def test_transparency_composited_on_white(tmp_path):
    assert BACKGROUND == (255, 255, 255)
    rs = np.random.RandomState(2)
    rgba = rs.randint(0, 256, (S, S, 4)).astype(np.uint8)
    rgba[0, 0] = 255, 0, 0, 0  # a fully transparent pixel hiding red: white, not red
    x = loaded(Image.fromarray(rgba), tmp_path)
    assert_near(x, composited(rgba[..., :3], rgba[..., 3]), 1 / 255)
    assert x[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    la = rgba[..., 1:3]  # gray and alpha
    x = loaded(Image.fromarray(la, "LA"), tmp_path)
    assert_near(x, composited(np.repeat(la[..., :1], 3, -1), la[..., 1]), 1 / 255)
    # a palette image whose index 1 is transparent (GIFs, small PNGs), and an RGB PNG whose colour key is
    pal = Image.new("P", (S, S), 0)
    pal.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    pal.paste(1, (0, 0, S // 2, S))  # left half: red, but transparent
    for fmt in ("PNG", "GIF"):
        x = loaded(pal, tmp_path, fmt, transparency=1)
        assert x[:, 0, 0].tolist() == [1.0, 1.0, 1.0] and x[:, 0, -1].tolist() == [0.0, 0.0, 1.0], fmt
    x = loaded(pal.convert("RGB"), tmp_path, transparency=(255, 0, 0))
    assert x[:, 0, 0].tolist() == [1.0, 1.0, 1.0] and x[:, 0, -1].tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation, corner", [(1, (0, 0)), (3, (-1, -1)), (6, (0, -1)), (8, (-1, 0))])
def test_exif_orientation_applied(tmp_path, fmt, orientation, corner):
    # stored: red top-left quarter on blue. Orientation 3 turns it 180 degrees, 6 a quarter turn
    # clockwise (red ends top-right), 8 anticlockwise (bottom-left), as a phone's viewer shows it
    img = Image.new("RGB", (S, S), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, S // 2, S // 2))
    exif = Image.Exif()
    exif[0x0112] = orientation
    x = loaded(img, tmp_path, fmt, exif=exif)
    red, blue = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    tol = 0.1 if fmt == "JPEG" else 0  # JPEG is lossy; red and blue differ by 1
    for y in (0, -1):
        for xx in (0, -1):
            assert_near(x[:, y, xx], red if (y, xx) == corner else blue, tol)


def test_size_guard_is_one_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow warns above it, refuses above twice it
    folder = dataset(tmp_path / "ds", [GOOD, {"image": "images/big.png", "prompt": "q", "answer": "x"}])
    for side in (25, 40):  # 625 pixels: Pillow's warning; 1600: its DecompressionBombError
        Image.new("RGB", (side, side)).save(folder / "images" / "big.png")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ValueError, match=r"image .*big\.png is too large to read: .*exceeds limit of") as e:
                load_image(str(folder / "images" / "big.png"), S)
            assert "shrink it first" in str(e.value) and type(e.value) is ValueError
            assert typical_image_side(str(folder)) == 20  # a.png's size; big.png is left to the full read
            assert load_error(folder).startswith(f"{folder / 'train.jsonl'}:2: image ")
        assert not caught, [str(w.message) for w in caught]  # no second line printed as a warning


def test_truncated_file_fails_at_load_not_later(tmp_path):
    folder = dataset(tmp_path / "ds", [GOOD])
    with pytest.raises(ValueError, match=r"cannot read image .*truncated\.png: image file is truncated"):
        load_image(str(folder / "images" / "truncated.png"), S)
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*nope\.png"):
        load_image(str(folder / "images" / "nope.png"), S)


# -----------------------------------------------------------------------------
# the prepare scripts' settings: one error line, nothing written


def make_sample(rng, stem):
    path = f"images/{stem}.png"
    return {"image": path, "prompt": "q", "answer": "a"}, [(path, Image.new("RGB", (4, 4)))]


@pytest.mark.parametrize("out, n_train, n_val, message", [
    ("ds", -5, 2, "error: --n_train must be at least 1 (a dataset needs training and validation samples), got -5"),
    ("ds", 2, 0, "error: --n_val must be at least 1"),
    ("file", 2, 2, "error: --out='{tmp}/file' is a file: give a folder (made if missing)"),
    ("", 2, 2, "error: --out='' is empty: give a folder"),
    ("file/sub", 2, 2, "error: cannot write toy to {tmp}/file/sub: "),
])
def test_prepare_settings_checked(tmp_path, out, n_train, n_val, message):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        prepare("toy", make_sample, str(tmp_path / out) if out else "", n_train, n_val, seed=1)
    assert str(e.value.code).startswith(message.format(tmp=tmp_path)), e.value.code
    assert "\n" not in str(e.value.code) and not (tmp_path / "ds").exists()
