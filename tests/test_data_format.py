"""
The dataset folder format (data/loader.py): every problem is one DataError naming the file and the
line; the shorthand and full line forms load; a lone image without a marker goes first; loss targets
are on the answer tokens and their <|endoftext|> only; any image comes out as (3, S, S) in [0, 1].
Datasets are built in tmp_path with a few tiny PNGs.
"""

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import casa
from data.loader import DataError, Dataset, read_split

torch.set_num_threads(1)
S = 16


def make_images(folder):
    """A few 20x20 (and odd-sized) PNGs in mixed modes; returns their relative paths."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    specs = {
        "images/rgb.png": Image.new("RGB", (20, 20), (255, 0, 0)),
        "images/gray.png": Image.new("L", (20, 20), 128),
        "images/rgba.png": Image.new("RGBA", (20, 20), (0, 255, 0, 100)),
        "images/pal.png": Image.new("P", (20, 20), 3),
        "images/wide.png": Image.new("RGB", (37, 11), (0, 0, 255)),
        "images/bw.png": Image.new("1", (20, 20), 1),
    }
    for rel, img in specs.items():
        img.save(folder / rel)
    return list(specs)


def write_split(folder, split, lines):
    """lines: dicts (dumped as JSON) or raw strings (written as they are)."""
    with open(folder / f"{split}.jsonl", "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


GOOD = {"image": "images/rgb.png", "prompt": "what color?", "answer": "red"}


def make_dataset(tmp_path, train_lines, val_lines=(GOOD,)):
    folder = tmp_path / "ds"
    make_images(folder)
    write_split(folder, "train", train_lines)
    write_split(folder, "val", list(val_lines))
    return folder


def expect_error(folder, lineno, pattern, split="train"):
    """Loading the split raises exactly one DataError naming the file and line, matching pattern."""
    with pytest.raises(DataError) as ei:
        Dataset(str(folder), split, S)
    msg = str(ei.value)
    path = os.path.join(str(folder), f"{split}.jsonl")
    assert msg.startswith(f"{path}:{lineno}:"), msg
    assert re.search(pattern, msg, re.I), msg
    # read_split (no images decoded) reports the same problem
    with pytest.raises(DataError, match=re.escape(f"{path}:{lineno}:")):
        read_split(str(folder), split)
    return msg


# -----------------------------------------------------------------------------
# errors: one clear message naming file and line


def test_bad_json_line(tmp_path):
    folder = make_dataset(tmp_path, [GOOD, GOOD, '{"image": "images/rgb.png", "prompt": "x", '])
    expect_error(folder, 3, r"JSON")


def test_bad_json_line_in_val_names_val(tmp_path):
    folder = make_dataset(tmp_path, [GOOD], [GOOD, "not json at all"])
    expect_error(folder, 2, r"JSON", split="val")


def test_blank_lines_skipped_but_counted(tmp_path):
    # line numbers are the file's: a blank line 2 is skipped, the error is on line 3
    folder = make_dataset(tmp_path, [GOOD, "", {"image": "images/rgb.png", "prompt": "x"}])
    expect_error(folder, 3, r"missing field 'answer'")


@pytest.mark.parametrize("rec, pattern", [
    ({"image": "images/rgb.png", "prompt": "what?"}, r"missing field 'answer'"),
    ({"image": "images/rgb.png", "answer": "red"}, r"missing field 'prompt'"),
    ({"image": "images/rgb.png"}, r"missing field"),
    ({"images": ["images/rgb.png"], "turns": [{"prompt": "<|image|> a"}]}, r"missing field 'answer'.*turn 0"),
    ({"images": ["images/rgb.png"], "turns": [{"prompt": "<|image|> a", "answer": "b"}, {"answer": "c"}]},
     r"missing field 'prompt'.*turn 1"),
])
def test_missing_fields(tmp_path, rec, pattern):
    folder = make_dataset(tmp_path, [GOOD, rec])
    expect_error(folder, 2, pattern)


def test_missing_image_file(tmp_path):
    folder = make_dataset(tmp_path, [GOOD, GOOD, GOOD, {"image": "images/nope.png", "prompt": "x", "answer": "y"}])
    msg = expect_error(folder, 4, r"not found")
    assert "images/nope.png" in msg


def test_too_many_markers(tmp_path):
    rec = {"image": "images/rgb.png", "prompt": "<|image|> and <|image|>?", "answer": "y"}
    folder = make_dataset(tmp_path, [rec])
    expect_error(folder, 1, r"2 <\|image\|> marker.*1 image")


def test_too_few_markers(tmp_path):
    rec = {"images": ["images/rgb.png", "images/gray.png", "images/rgba.png"],
           "turns": [{"prompt": "<|image|> first", "answer": "a"}, {"prompt": "<|image|> second", "answer": "b"}]}
    folder = make_dataset(tmp_path, [GOOD, rec])
    expect_error(folder, 2, r"2 <\|image\|> marker.*3 image")


def test_several_images_no_marker(tmp_path):
    rec = {"images": ["images/rgb.png", "images/gray.png"], "prompt": "compare", "answer": "a"}
    folder = make_dataset(tmp_path, [rec])
    expect_error(folder, 1, r"0 <\|image\|> marker.*2 image")


def test_markers_without_images(tmp_path):
    folder = make_dataset(tmp_path, [{"prompt": "<|image|> hi", "answer": "a"}])
    expect_error(folder, 1, r"1 <\|image\|> marker.*0 image")


# -----------------------------------------------------------------------------
# the two line forms, marker placement, loss targets


def reference_tokens(turns):
    """Independent expectation: ids and targets from casa.encode_turn, turn after turn."""
    tok = casa.get_tokenizer()
    ids, loss = [], []
    for prompt, answer in turns:
        t, n_prompt = casa.encode_turn(tok, prompt, answer)
        ids += t
        loss += [False] * n_prompt + [True] * (len(t) - n_prompt)
    targets = [ids[i + 1] if loss[i + 1] else -1 for i in range(len(ids) - 1)]
    return ids, targets


def test_shorthand_and_full_forms_load(tmp_path):
    short = {"image": "images/rgb.png", "prompt": "what color?", "answer": "red", "task": "color", "extra": 1}
    full = {"images": ["images/gray.png", "images/wide.png"],
            "turns": [{"prompt": "<|image|> what is it?", "answer": "gray"},
                      {"prompt": "and <|image|>?", "answer": "blue"}], "task": "two"}
    no_image = {"prompt": "say hi", "answer": "hi"}
    folder = make_dataset(tmp_path, [short, full, no_image])
    ds = Dataset(str(folder), "train", S)
    assert len(ds) == 3
    assert ds.tasks == ["", "color", "two"]
    s0, s1, s2 = ds.samples
    assert s0.turns == [(casa.IMAGE + "what color?", "red")] and s0.task == "color"
    assert [os.path.basename(p) for p in s0.images] == ["rgb.png"]
    assert s1.turns == [("<|image|> what is it?", "gray"), ("and <|image|>?", "blue")]
    assert [os.path.basename(p) for p in s1.images] == ["gray.png", "wide.png"]
    assert s2.images == [] and s2.turns == [("say hi", "hi")]
    for s in ds.samples:
        assert s.ids == reference_tokens(s.turns)[0]
    # images of the batch: one per marker, in order
    idx, targets, images = ds.batch([0, 1, 2])
    assert images.shape == (3, 3, S, S)
    img_id = ds.tokenizer.encode(casa.IMAGE, allowed_special="all")[0]
    assert int((idx == img_id).sum()) == 3


def test_lone_image_marker_goes_first(tmp_path):
    rec = {"images": ["images/rgb.png"],
           "turns": [{"prompt": "first question", "answer": "a"}, {"prompt": "second", "answer": "b"}]}
    folder = make_dataset(tmp_path, [rec])
    s = Dataset(str(folder), "train", S).samples[0]
    assert s.turns[0][0] == casa.IMAGE + "first question"
    assert s.turns[1][0] == "second"
    img_id = casa.get_tokenizer().encode(casa.IMAGE, allowed_special="all")[0]
    assert s.ids[0] == img_id and s.ids.count(img_id) == 1


def test_loss_targets_only_on_answers_and_eot(tmp_path):
    recs = [
        {"image": "images/rgb.png", "prompt": "what color is it?", "answer": "red"},
        {"images": ["images/gray.png", "images/pal.png"],
         "turns": [{"prompt": "<|image|> one", "answer": "a longer answer"},
                   {"prompt": "two <|image|>", "answer": "x"}]},
        {"prompt": "no image here", "answer": "ok"},
    ]
    folder = make_dataset(tmp_path, recs)
    ds = Dataset(str(folder), "train", S)
    idx, targets, _ = ds.batch([0, 1, 2])
    tok = casa.get_tokenizer()
    eot = tok.encode(casa.ENDOFTEXT, allowed_special="all")[0]
    turns = [[(casa.IMAGE + "what color is it?", "red")],
             [("<|image|> one", "a longer answer"), ("two <|image|>", "x")],
             [("no image here", "ok")]]
    T = idx.size(1)
    assert T == max(len(reference_tokens(t)[0]) - 1 for t in turns)
    for r, t in enumerate(turns):
        ids, want = reference_tokens(t)
        n = len(ids) - 1
        assert idx[r, :n].tolist() == ids[:-1]
        assert (idx[r, n:] == eot).all()  # padding
        assert targets[r, :n].tolist() == want
        assert (targets[r, n:] == -1).all()
        # the non-ignored targets are exactly the answers' tokens, each followed by <|endoftext|>
        got = [x for x in targets[r].tolist() if x != -1]
        expect = []
        for _, answer in t:
            expect += tok.encode(answer) + [eot]
        assert got == expect
    # and decoding what is trained on gives the answers back
    assert tok.decode([x for x in targets[1].tolist() if x not in (-1, eot)]) == "a longer answerx"


def test_images_any_size_and_mode(tmp_path):
    rels = make_images(tmp_path / "ds")
    recs = [{"image": rel, "prompt": "q", "answer": "a"} for rel in rels]
    folder = make_dataset(tmp_path, recs)
    ds = Dataset(str(folder), "train", S)
    for i, rel in enumerate(rels):
        img = ds.sample_images(ds.samples[i])
        assert img.shape == (1, 3, S, S) and img.dtype == torch.float32
        assert img.min() >= 0.0 and img.max() <= 1.0
        # independent reference: Pillow's RGB conversion (a transparent image composited on white by
        # hand first) and resize
        ref = Image.open(folder / rel)
        if ref.mode == "RGBA":
            a = np.asarray(ref, dtype=np.float64)
            alpha = a[..., 3:] / 255
            ref = Image.fromarray((a[..., :3] * alpha + 255 * (1 - alpha)).round().astype(np.uint8))
        ref = ref.convert("RGB").resize((S, S), Image.BICUBIC)
        ref = torch.tensor(list(ref.tobytes()), dtype=torch.float32).view(S, S, 3).permute(2, 0, 1) / 255.0
        assert torch.allclose(img[0], ref, atol=1 / 255 + 1e-6), rel
    # solid colours come out as those colours
    red = ds.sample_images(ds.samples[rels.index("images/rgb.png")])[0]
    assert torch.allclose(red[:, 5, 5], torch.tensor([1.0, 0.0, 0.0]))
    gray = ds.sample_images(ds.samples[rels.index("images/gray.png")])[0]
    assert torch.allclose(gray[:, 5, 5], torch.full((3,), 128 / 255))
    green = ds.sample_images(ds.samples[rels.index("images/rgba.png")])[0]  # (0, 255, 0) at alpha 100, on white
    assert torch.allclose(green[:, 5, 5], torch.tensor([155, 255, 155]) / 255, atol=1 / 255)
    # blind: zeros of the same shape
    blind = Dataset(str(folder), "train", S, blind=True)
    z = blind.sample_images(blind.samples[0])
    assert z.shape == (1, 3, S, S) and (z == 0).all()


def test_unreadable_image_names_line(tmp_path):
    folder = make_dataset(tmp_path, [GOOD, {"image": "images/broken.png", "prompt": "q", "answer": "a"}])
    (folder / "images" / "broken.png").write_bytes(b"this is not a png")
    msg = expect_error_dataset_only(folder, 2)
    assert "broken.png" in msg


def expect_error_dataset_only(folder, lineno, split="train"):
    with pytest.raises(DataError) as ei:
        Dataset(str(folder), split, S)
    msg = str(ei.value)
    assert msg.startswith(f"{os.path.join(str(folder), split + '.jsonl')}:{lineno}:"), msg
    return msg
