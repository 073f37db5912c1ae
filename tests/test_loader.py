"""data/loader.py: format errors name file:line; tokenization puts the loss on answers only; the
lone-image marker goes first; batches pad correctly and are reproducible; eval prompts; auto-prepare."""

import math
import json
import os
import re

import pytest
import torch
from conftest import write_tiny_dataset
from PIL import Image

import casa
from data.loader import (DataError, Dataset, KindErrors, eval_batches, load_image, resolve_dataset, shift_images, text_tokens,
                         typical_image_side)

S = 16
TOK = casa.get_tokenizer()
IMAGE_ID = TOK.encode(casa.IMAGE, allowed_special="all")[0]
EOT = TOK.encode(casa.ENDOFTEXT, allowed_special="all")[0]
GOOD = {"image": "a.png", "prompt": "what color?", "answer": "red"}


def folder_with(tmp_path, train_lines, val_lines=(GOOD,)):
    Image.new("RGB", (10, 10), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (7, 13), 200).save(tmp_path / "b.png")  # another size and mode
    for split, lines in (("train", train_lines), ("val", val_lines)):
        text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
        (tmp_path / f"{split}.jsonl").write_text(text)
    return tmp_path


@pytest.mark.parametrize("bad, line, pattern", [
    ('{"image": "a.png", "prompt": ', 2, r"not valid JSON"),
    ('["a list"]', 2, r"expected a JSON object"),
    ({"image": "a.png", "prompt": "q"}, 2, r"missing field 'answer'"),
    ({"image": "a.png", "answer": "a"}, 2, r"missing field 'prompt'"),
    ({"images": ["a.png"], "turns": [{"prompt": "<|image|>q"}]}, 2, r"missing field 'answer' in turn 0"),
    ({"image": "a.png", "prompt": "q", "answer": 3}, 2, r"'answer' must be a string"),
    ({"image": "missing.png", "prompt": "q", "answer": "a"}, 2, r"image file not found: missing.png"),
    ({"image": "a.png", "prompt": "<|image|> and <|image|>", "answer": "a"}, 2, r"2 <\|image\|> marker.*1 image"),
    ({"images": ["a.png", "b.png"], "prompt": "q", "answer": "a"}, 2, r"0 <\|image\|> marker.*2 image.*one <\|image\|> marker per image"),
    ({"prompt": "<|image|> q", "answer": "a"}, 2, r"1 <\|image\|> marker.*0 image"),
    ({"image": "a.png", "prompt": "q <|answer|>", "answer": "a"}, 2, r"cannot tokenize"),
    ({"image": "a.png", "prompt": "q", "answer": ""}, 2, r"empty 'answer'"),
    ({"images": ["a.png"], "turns": [{"prompt": "<|image|>q", "answer": "a"}, {"prompt": "q", "answer": " "}]}, 2,
     r"empty 'answer' in turn 1"),
])
def test_format_errors_name_file_and_line(tmp_path, bad, line, pattern):
    folder = folder_with(tmp_path, [GOOD, bad, GOOD])
    with pytest.raises(DataError) as e:
        Dataset(str(folder), "train", S)
    msg = str(e.value)
    assert msg.startswith(f"{folder / 'train.jsonl'}:{line}: "), msg
    assert re.search(pattern, msg), msg


def test_error_line_numbers_count_blank_lines(tmp_path):
    folder = folder_with(tmp_path, [GOOD], [GOOD, "", "", "{oops"])
    with pytest.raises(DataError, match=re.escape(f"{folder / 'val.jsonl'}:4: not valid JSON")):
        Dataset(str(folder), "val", S)


def test_answer_only_loss_and_lone_marker_first(tmp_path):
    folder = folder_with(tmp_path, [GOOD, {"image": "b.png", "prompt": "shape?", "answer": "a longer answer"}])
    ds = Dataset(str(folder), "train", S)
    s = ds.samples[0]
    assert s.turns == [(casa.IMAGE + "what color?", "red")]  # no marker, one image: it goes first
    assert s.ids[0] == IMAGE_ID
    idx, targets, images = ds.batch([0, 1])
    assert images.shape == (2, 3, S, S) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    for row, answer in enumerate(["red", "a longer answer"]):
        t = targets[row]
        # the supervised tokens are exactly the answer and its <|endoftext|>
        assert TOK.decode([x for x in t.tolist() if x != -1 and x != EOT]) == answer
        assert t[t != -1].tolist()[-1] == EOT
        # ... predicted from the position before each of them (shifted by one)
        n = len(ds.samples[row].ids) - 1
        assert idx[row, :n].tolist() == ds.samples[row].ids[:-1]
        first = (t != -1).nonzero()[0].item()
        assert idx[row, first].item() == TOK.encode(casa.ANSWER, allowed_special="all")[0]
    # the shorter row is padded with <|endoftext|>, without loss
    n0 = len(ds.samples[0].ids) - 1
    assert (idx[0, n0:] == EOT).all() and (targets[0, n0:] == -1).all()
    assert text_tokens(targets) == n0 + len(ds.samples[1].ids) - 1


def test_multi_turn_markers_and_eval_items(tmp_path):
    rec = {"images": ["a.png", "b.png"], "task": "two",
           "turns": [{"prompt": "<|image|>first?", "answer": "red"}, {"prompt": "then <|image|>?", "answer": "gray"}]}
    folder = folder_with(tmp_path, [rec, GOOD])
    ds = Dataset(str(folder), "train", S)
    assert ds.tasks == ["", "two"]
    _, targets, images = ds.batch([0])
    assert images.shape == (2, 3, S, S)
    assert TOK.decode([x for x in targets[0].tolist() if x not in (-1, EOT)]) == "redgray"
    items = ds.eval_items()
    assert [it["truth"] for it in items] == ["red", "gray", "red"]
    first, second = items[0], items[1]
    # the second turn's prompt holds the first turn with its true answer, and both images
    assert TOK.decode(second["ids"]) == "<|image|>first?<|answer|>red<|endoftext|>then <|image|>?<|answer|>"
    assert first["images"].shape[0] == 1 and second["images"].shape[0] == 2
    assert torch.equal(second["images"][0], first["images"][0])
    # eval batches: equal prompt lengths only (no padding); markers match images
    seen = 0
    for idx, imgs, chunk in eval_batches(items, batch_size=8):
        assert all(len(it["ids"]) == idx.size(1) for it in chunk)
        assert int((idx == IMAGE_ID).sum()) == imgs.size(0)
        seen += len(chunk)
    assert seen == 3
    assert ds.max_answer_len() == len(TOK.encode("gray")) + 1


def test_batches_reproducible_and_blind(tmp_path):
    folder = write_tiny_dataset(tmp_path / "d")
    ds = Dataset(str(folder), "train", S)
    a = ds.get_batch(5, torch.Generator().manual_seed(3))
    b = ds.get_batch(5, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3])) and a[3] is None and b[3] is None
    assert a[2] is not None and float(a[2].sum()) > 0
    blind = Dataset(str(folder), "train", S, blind=True)
    c = blind.get_batch(5, torch.Generator().manual_seed(3))
    assert torch.equal(c[0], a[0]) and torch.equal(c[1], a[1])  # same text
    assert c[2].shape == a[2].shape and float(c[2].abs().sum()) == 0  # blank images


def test_balanced_kinds_draw_every_kind_equally(tmp_path):
    # 9 lines of one kind, 1 of another: drawn with kind_weights each kind comes up equally often
    # (drawn plainly, 1 in 10)
    lines = [{"image": "a.png", "prompt": "what color is it?", "answer": "red"}] * 9
    lines += [{"image": "a.png", "prompt": "how big is it?", "answer": "small"}]
    ds = Dataset(str(folder_with(tmp_path, lines)), "train", S)
    w = ds.kind_weights()
    assert float(w[:9].sum()) == pytest.approx(float(w[9]))
    g = torch.Generator().manual_seed(0)
    rows = torch.multinomial(w, 4000, replacement=True, generator=g)
    assert 0.45 < float((rows == 9).double().mean()) < 0.55
    # get_batch draws through the weights: all weight on one sample gives only that sample
    one = torch.zeros(len(ds), dtype=torch.float64)
    one[9] = 1.0
    idx, _, _, _ = ds.get_batch(6, torch.Generator().manual_seed(1), one)
    assert all(torch.equal(row, ds.batch([9])[0][0]) for row in idx)
    # a line of several turns counts for each of its kinds: the rare kind still comes up more often
    two = {"images": ["a.png", "a.png"], "turns": [{"prompt": "<|image|> what color is it?", "answer": "red"},
                                                   {"prompt": "<|image|> how big is it?", "answer": "small"}]}
    ds = Dataset(str(folder_with(tmp_path, lines + [two])), "train", S)
    w = ds.kind_weights()
    assert float(w[9] + w[10]) > float(w[:9].sum()) / 2


def test_questions_about_one_picture_come_together_and_share_its_image(tmp_path):
    # three pictures with 4, 3 and 1 questions (a.png, b.png: different pixels; c.png a copy of b's
    # file under another name, so it is another picture); get_batch(per_image=3) takes up to 3
    # questions of each picture it draws, never one twice, and each picture's image once
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255)), ("c", (0, 0, 255))):
        Image.new("RGB", (10, 10), colour).save(tmp_path / f"{name}.png")
    lines = [{"image": f"{n}.png", "prompt": f"question {i} about {n}?", "answer": str(i)}
             for n, k in (("a", 4), ("b", 3), ("c", 1)) for i in range(k)]
    lines += [{"prompt": "a question without a picture?", "answer": "x"}] * 2  # each a group of its own
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ds = Dataset(str(tmp_path), "train", S)
    picture = [os.path.basename(s.images[0]) if s.images else f"text {i}" for i, s in enumerate(ds.samples)]
    assert ds.same_images[8] == [8] and ds.same_images[9] == [9] and ds.same_images[0] == [0, 1, 2, 3]
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        groups = ds.draw_groups(7, gen, ds.kind_weights(), per_image=3)
        assert sum(map(len, groups)) == 7
        for g in groups:  # one picture, no question twice, as many as it has up to 3 (the last may be cut)
            assert len({picture[i] for i in g}) == 1 and len(set(g)) == len(g) <= 3
            assert len(g) == min(3, len(ds.same_images[g[0]])) or g is groups[-1]
            seen.add(tuple(sorted(g)))
        # the batch's images, each marker's through image_index, are what batch() gives the same rows
        state = gen.get_state()
        drawn = ds.draw_groups(7, gen, ds.kind_weights(), per_image=3)
        rows = [i for g in drawn for i in g]
        gen.set_state(state)
        idx, targets, images, image_index = ds.get_batch(7, gen, ds.kind_weights(), per_image=3)
        plain_idx, plain_targets, plain_images = ds.batch(rows)
        assert torch.equal(idx, plain_idx) and torch.equal(targets, plain_targets)
        if image_index is None:  # every group drawn was one question (or no picture): the plain batch
            assert len(drawn) == 7 or images is None
            assert (images is None and plain_images is None) or torch.equal(images, plain_images)
            continue
        assert torch.equal(images[image_index], plain_images)
        assert images.size(0) == len({picture[i] for i in rows if ds.samples[i].images})  # each picture once
    assert len(seen) > 10  # different questions of a picture come up, not always the same ones
    # per_image=1 is the plain draw: images one per marker, no index
    idx, targets, images, image_index = ds.get_batch(5, gen, None, per_image=1)
    assert image_index is None and images.size(0) == int((idx == IMAGE_ID).sum())
    # blind: blank images, shared all the same
    blind = Dataset(str(tmp_path), "train", S, blind=True)
    for _ in range(5):  # till a draw shares a picture
        idx, _, images, image_index = blind.get_batch(6, gen, None, per_image=3)
        if image_index is not None:
            break
    assert image_index is not None, "five draws of 6 and never two questions of one picture"
    assert float(images.abs().sum()) == 0 and image_index.numel() == int((idx == IMAGE_ID).sum())


def test_typical_image_side(tmp_path):
    lines = [{"image": f"{n}.png", "prompt": "q?", "answer": "a"} for n in ("a", "b", "c")]
    folder = folder_with(tmp_path, lines)
    for name, size in (("a", (48, 80)), ("b", (50, 50)), ("c", (200, 120))):
        Image.new("RGB", size).save(folder / f"{name}.png")
    assert typical_image_side(str(folder)) == 50  # shorter sides 48, 50, 120: the median
    assert typical_image_side(str(folder), n=1) == 48  # the first image only


def test_block_size_error(tmp_path):
    folder = folder_with(tmp_path, [GOOD, {"image": "a.png", "prompt": "x" * 50, "answer": "y"}])
    ds = Dataset(str(folder), "train", S)
    with pytest.raises(DataError, match=r"train.jsonl:2: sample is 53 tokens, longer than block_size=32"):
        ds.check_block_size(32)
    ds.check_block_size(53)  # marker + 50 + <|answer|> + y + <|endoftext|>, minus the last


def test_resolve_dataset_paths_names_and_auto_prepare(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    (data_dir / "toy").mkdir(parents=True)
    # a built-in dataset without its files: its prepare.py runs once, as a module (python -m
    # data.toy.prepare from the folder above data/), whatever the current folder is
    (data_dir / "toy" / "prepare.py").write_text(
        "import os\nassert __spec__.name == 'data.toy.prepare', __spec__\n"
        "here = os.path.dirname(os.path.abspath(__file__))\n"
        "for s in ('train', 'val'):\n"
        "    open(os.path.join(here, s + '.jsonl'), 'w').write('{\"prompt\": \"q\", \"answer\": \"a\"}\\n')\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert resolve_dataset("toy", data_dir=str(data_dir)) == str(data_dir / "toy")
    assert (data_dir / "toy" / "train.jsonl").exists()
    assert len(Dataset(str(data_dir / "toy"), "val", S)) == 1
    # a path is used as it is
    own = write_tiny_dataset(tmp_path / "mine")
    assert resolve_dataset(str(own), data_dir=str(data_dir)) == str(own)
    with pytest.raises(FileNotFoundError, match=r"no train.jsonl.*built-in names: toy"):
        resolve_dataset("nope", data_dir=str(data_dir))
    # a prepare script that fails: one error that names the command (its own message went to stderr)
    (data_dir / "broken").mkdir()
    (data_dir / "broken" / "prepare.py").write_text("raise SystemExit('error: out of disk')\n")
    with pytest.raises(OSError, match=r"dataset 'broken': `python -m data.broken.prepare` \(in .*\) failed with exit code 1"):
        resolve_dataset("broken", data_dir=str(data_dir))


def test_load_image(tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*nope\.png"):
        load_image(str(tmp_path / "nope.png"), 16)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"cannot read image"):
        load_image(str(tmp_path / "bad.png"), 16)
    # any mode and size -> (3, S, S) floats in [0, 1], values from the RGB pixels
    img = PIL.new("L", (20, 12), color=51)  # grayscale
    img.save(tmp_path / "gray.png")
    x = load_image(str(tmp_path / "gray.png"), 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.full((3, 16, 16), 51 / 255))
    rgba = PIL.new("RGBA", (16, 16), color=(255, 0, 102, 10))  # almost transparent: almost the white background
    x = load_image(rgba, 16)
    want = (torch.tensor([255, 0, 102]) * 10 + 255 * 245) / 255 / 255
    torch.testing.assert_close(x[:, 3, 5], want, atol=1 / 255, rtol=0)


def test_balanced_groups_even_out_the_kinds_a_picture_asks(tmp_path):
    # every picture asks one "what shape" and five "is there" questions: drawn a picture's questions
    # at a time with kind weights, the batch still holds the two kinds about equally often
    lines = []
    for p in range(12):
        Image.new("RGB", (8, 8), (20 * p, 0, 0)).save(tmp_path / f"p{p}.png")
        lines.append({"image": f"p{p}.png", "prompt": f"what shape is thing {p}?", "answer": "circle"})
        lines += [{"image": f"p{p}.png", "prompt": f"is there a thing {p} {i}?", "answer": "yes"} for i in range(5)]
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ds = Dataset(str(tmp_path), "train", S)
    is_shape = ["what shape" in s.turns[0][0] for s in ds.samples]
    gen = torch.Generator().manual_seed(0)

    def shape_share(weights):
        rows = [i for _ in range(300) for g in ds.draw_groups(16, gen, weights, per_image=6) for i in g]
        return sum(is_shape[i] for i in rows) / len(rows)

    assert 0.44 < shape_share(ds.kind_weights()) < 0.56
    assert 0.14 < shape_share(None) < 0.20  # unweighted: the pictures' own mix, 1 in 6


def test_kind_errors_draw_the_kinds_answered_wrong_more_often(tmp_path):
    # two kinds, three questions a picture each way; the model answers every "is there" right and
    # every "what shape" wrong: the rates move towards 0 and 1 about 1% a question, and the draw
    # (kinds balanced, then 0.1 + rate) comes to hold shape questions about 11 times as often
    lines = []
    for p in range(10):
        Image.new("RGB", (8, 8), (20 * p, 0, 0)).save(tmp_path / f"p{p}.png")
        lines += [{"image": f"p{p}.png", "prompt": f"what shape is thing {p} {i}?", "answer": "circle"} for i in range(3)]
        lines += [{"image": f"p{p}.png", "prompt": f"is there a thing {p} {i}?", "answer": "yes"} for i in range(3)]
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ds = Dataset(str(tmp_path), "train", S)
    is_shape = torch.tensor(["what shape" in s.turns[0][0] for s in ds.samples])
    errors = KindErrors(ds)
    assert [k[:10] for k in errors.kinds] == ["is there _", "what shape"] and errors.rates.tolist() == [1.0, 1.0]
    equal = ds.kind_weights()
    assert torch.allclose(errors.weights(equal), equal * 1.1)  # all wrong: every kind alike
    rows = [0, 3, 3, 4]  # a sample drawn twice counts once: 1 shape and 2 "is there" questions here
    errors.record(rows, ~is_shape[rows])
    assert torch.allclose(errors.rates, torch.tensor([1 - (1 - 0.99**2), 1.0], dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):  # the draw follows the rates as they move
        drawn = [r for g in ds.draw_groups(12, gen, errors.weights(equal), per_image=6) for r in g]
        errors.record(drawn, ~is_shape[drawn])
    assert errors.rates[0] < 0.01 and errors.rates[1] == 1.0
    drawn = [r for _ in range(200) for g in ds.draw_groups(12, gen, errors.weights(equal), per_image=6) for r in g]
    share = is_shape[drawn].double().mean().item()
    assert 0.88 < share < 0.94  # 1.1 / (1.1 + 0.1) = 0.917
    assert KindErrors(ds, [0.5, 0.25]).rates.tolist() == [0.5, 0.25]  # a resumed run's rates
    assert KindErrors(ds, [0.5]).rates.tolist() == [1.0, 1.0]  # rates of another dataset: ignored
    assert KindErrors(ds, ["x", None]).rates.tolist() == [1.0, 1.0]  # and a damaged checkpoint's


def test_kind_errors_draw_the_kind_furthest_from_its_prior_most(tmp_path):
    # a yes/no kind (half yes: its prior's error 0.5) and a five-way kind (one answer in 5: 0.8). At
    # error rates 0.5 and 0.4 the yes/no kind is still at its prior while the other is half learned,
    # although its error is lower: drawn by standing, the yes/no kind comes 1.1 : 0.1 + e^-(0.5 / 0.3);
    # drawn by 0.1 + rate (focus_hardest=False), only 0.6 : 0.5
    lines = []
    for p in range(20):
        Image.new("RGB", (8, 8), (10 * p, 0, 0)).save(tmp_path / f"p{p}.png")
        lines.append({"image": f"p{p}.png", "prompt": "is it left?", "answer": "yes" if p % 2 else "no"})
        lines.append({"image": f"p{p}.png", "prompt": "what shape?", "answer": "abcde"[p % 5]})
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ds = Dataset(str(tmp_path), "train", S)
    errors = KindErrors(ds, hardest=True)
    assert errors.kinds == ["is it left?", "what shape?"]
    assert errors.prior_error.tolist() == pytest.approx([0.5, 0.8])
    assert errors.shares() == {"is it left?": 0.5, "what shape?": 0.5}  # all wrong: alike
    errors.rates = torch.tensor([0.5, 0.8], dtype=torch.float64)  # both at their prior: alike
    assert errors.shares() == {"is it left?": 0.5, "what shape?": 0.5}
    errors.rates = torch.tensor([0.5, 0.4], dtype=torch.float64)
    hardest = 1.1 / (1.1 + 0.1 + math.exp(-0.5 / 0.3))
    assert errors.shares()["is it left?"] == pytest.approx(hardest, abs=1e-3)
    is_left = torch.tensor(["left" in s.turns[0][0] for s in ds.samples])
    gen = torch.Generator().manual_seed(0)
    drawn = [r for _ in range(300) for g in ds.draw_groups(16, gen, errors.weights(ds.kind_weights()), per_image=2)
             for r in g]
    assert is_left[drawn].double().mean().item() == pytest.approx(hardest, abs=0.03)  # the draw follows
    plain = KindErrors(ds, [0.5, 0.4])  # --focus_hardest=False
    assert plain.shares()["is it left?"] == pytest.approx(0.6 / 1.1, abs=1e-3)


def test_shift_images_moves_each_image_and_repeats_its_edges():
    # an independent reference: pixel (y, x) of the shifted image is the original's at (y + dy - p,
    # x + dx - p), clamped into the image, for one (dy, dx) in [0, 2p]^2 per image
    p, S = 3, 8
    images = torch.rand(6, 3, S, S)
    out = shift_images(images, p, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    ys = torch.arange(S)

    def shifted(img, dy, dx):
        rows, cols = (ys + dy - p).clamp(0, S - 1), (ys + dx - p).clamp(0, S - 1)
        return img[:, rows][:, :, cols]

    found = [[(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
              if torch.equal(out[i], shifted(images[i], dy, dx))] for i in range(len(images))]
    assert all(len(f) == 1 for f in found)
    assert len({f[0] for f in found}) > 1  # images move by different amounts
    # same=True: one shift for all (the frames of a clip); 0: the images as they were
    same = shift_images(images[:1].expand(4, -1, -1, -1), p, torch.Generator().manual_seed(1), same=True)
    assert all(torch.equal(same[0], s) for s in same) and not torch.equal(same[0], images[0])
    assert shift_images(images, 0, torch.Generator()) is images
