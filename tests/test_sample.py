"""sample.py end to end on a tiny checkpoint saved the way train.py saves it: one image with a prompt
(the greedy answer equal to the model's own), sampling with temperature, the validation samples and
the --grid picture, and one clear error line for each mistake. Each sample.py process costs seconds
(importing torch), so each run here checks several things."""

import re

import pytest
import torch
from conftest import run, write_tiny_dataset
from PIL import Image

import casa
from data.loader import answer, load_image

S = 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    data = write_tiny_dataset(d / "data")
    torch.manual_seed(0)
    config = casa.Config(n_layer=2, n_head=2, n_embd=32, n_vis_layer=1, n_vis_head=2, n_vis_embd=32, image_size=S,
                         patch_size=8, block_size=64)
    model = casa.VLM(config).eval()
    path = d / "ckpt.pt"
    casa.save_checkpoint(path, model, step=7, train_args={"dataset": str(data), "blind": False},
                         dataset_dir=str(data))
    Image.new("LA", (33, 21), (200, 255)).save(d / "odd.png")  # any size and mode
    return path, d / "odd.png", model


def test_one_image_with_a_prompt(ckpt):
    path, img, model = ckpt
    r = run("sample.py", f"--ckpt={path}", f"--image={img}", "--prompt=what color?", "--max_new_tokens=6")
    assert "ca, step 7" in r.stdout
    assert re.search(r", \d+ CPU thread\(s\) \(\d+ cores", r.stdout), r.stdout  # threads=0: casa.pick_threads
    lines = [line for line in r.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 1, r.stdout
    m = re.fullmatch(r"\[0\] '<img>what color\?' -> (.*)", lines[0])
    assert m, lines[0]
    # independent reference: the same greedy answer computed here from the same weights
    tok = casa.get_tokenizer()
    ids, _ = casa.encode_turn(tok, casa.IMAGE + "what color?")
    images = load_image(img, S)[None]
    with torch.no_grad():
        assert m.group(1) == repr(answer(model, torch.tensor([ids]), images, tok, 6)[0])


def test_validation_samples_and_grid(ckpt, tmp_path):
    path, _, _ = ckpt
    out = tmp_path / "new" / "grid.png"  # a folder that does not exist yet: sample.py makes it
    r = run("sample.py", f"--ckpt={path}", "--num_samples=5", f"--grid={out}", "--max_new_tokens=4")
    assert "5 of 8 val answers" in r.stdout
    assert len(re.findall(r"^\[(ok |BAD)\] .*truth=.* pred=", r.stdout, re.M)) == 5, r.stdout
    assert re.search(r"exact match: \d/5", r.stdout)
    with Image.open(out) as pic:
        pic.load()
        assert pic.format == "PNG"
        # 4 columns of 160 px cells, 2 rows: a sensible picture, not a sliver or a poster
        assert 4 * 160 <= pic.width <= 1200 and 2 * 160 <= pic.height <= 1500, pic.size
        assert len(pic.convert("RGB").getcolors(maxcolors=1 << 20)) > 3  # images and text drawn, not blank


def test_temperature_sampling_and_grid_with_image(ckpt, tmp_path):
    path, img, _ = ckpt
    out = tmp_path / "one.png"
    r = run("sample.py", f"--ckpt={path}", f"--image={img}", "--temperature=1.0", "--top_k=5", "--num_samples=3",
            "--seed=1", f"--grid={out}", "--max_new_tokens=4")
    assert len(re.findall(r"^\[\d\] '<img>describe the image.' -> ", r.stdout, re.M)) == 3, r.stdout
    with Image.open(out) as pic:
        assert pic.size[0] >= 160 and pic.size[1] >= 160


def test_clear_errors(ckpt, tmp_path):
    path, _, _ = ckpt
    r = run("sample.py", f"--ckpt={path}", f"--image={tmp_path / 'nope.png'}", check=False)
    assert r.returncode != 0 and "image file not found" in r.stderr and "nope.png" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    missing = tmp_path / "gone" / "ckpt.pt"
    r = run("sample.py", f"--ckpt={missing}", check=False)
    assert r.returncode != 0 and "checkpoint not found" in r.stderr and str(missing) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = run("sample.py", "--tempreature=1", check=False)
    assert r.returncode != 0 and "unknown setting --tempreature (did you mean --temperature?)" in r.stderr
    assert "Traceback" not in r.stderr
