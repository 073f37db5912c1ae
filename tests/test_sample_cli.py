"""
sample.py end to end: a tiny checkpoint (casa.save_checkpoint with the keys train.py writes), asked
about one image with a prompt, the validation samples with a --grid picture, and a missing --ckpt.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import casa  # noqa: E402
from conftest import write_color_dataset  # noqa: E402
from data.loader import Dataset, answer, eval_batches  # noqa: E402

torch.set_num_threads(1)
S = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny dataset and an untrained tiny model saved as train.py saves it."""
    d = tmp_path_factory.mktemp("sample")
    data = write_color_dataset(d / "data", n_train=4, n_val=6)
    torch.manual_seed(0)
    config = casa.Config(n_layer=1, n_embd=32, n_head=2, n_vis_layer=1, n_vis_embd=32, n_vis_head=2,
                         image_size=S, patch_size=8, block_size=64, variant="ca")
    model = casa.VLM(config).eval()
    ckpt = d / "ckpt.pt"
    casa.save_checkpoint(str(ckpt), model, step=7, train_args={"dataset": str(data), "blind": False},
                         dataset_dir=str(data))
    photo = d / "photo.png"
    Image.new("LA", (33, 21), (200, 255)).save(photo)  # odd size and mode on purpose
    return dict(dir=d, data=data, ckpt=ckpt, photo=photo, model=model)


def run_sample(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_image_and_prompt(setup):
    r = run_sample(f"--ckpt={setup['ckpt']}", f"--image={setup['photo']}", "--prompt=what color is it?",
                   "--max_new_tokens=5")
    assert r.returncode == 0, r.stderr
    assert "ca, step 7" in r.stdout
    lines = [line for line in r.stdout.splitlines() if line.startswith("[0]")]
    assert len(lines) == 1, r.stdout
    m = re.fullmatch(r"\[0\] '<img>what color is it\?' -> (.*)", lines[0])
    assert m, lines[0]
    # independent reference: the same greedy answer computed here from the same weights
    tok = casa.get_tokenizer()
    ids, _ = casa.encode_turn(tok, casa.IMAGE + "what color is it?")
    img = casa.load_image(str(setup["photo"]), S)[None]
    with torch.no_grad():
        want = answer(setup["model"], torch.tensor([ids]), img, tok, 5)[0]
    assert m.group(1) == repr(want)


def test_sampling_draws_num_samples(setup):
    r = run_sample(f"--ckpt={setup['ckpt']}", f"--image={setup['photo']}", "--prompt=<|image|> hi",
                   "--temperature=1.0", "--num_samples=3", "--max_new_tokens=3")
    assert r.returncode == 0, r.stderr
    assert sum(line.startswith(f"[{i}] ") for line in r.stdout.splitlines() for i in range(3)) == 3, r.stdout


def test_grid_of_validation_samples(setup, tmp_path):
    out = tmp_path / "grid.png"
    r = run_sample(f"--ckpt={setup['ckpt']}", f"--grid={out}", "--num_samples=5", "--max_new_tokens=4")
    assert r.returncode == 0, r.stderr
    assert "5 of 6 val answers" in r.stdout
    assert len(re.findall(r"^\[(ok |BAD)\] ", r.stdout, re.M)) == 5, r.stdout
    assert re.search(r"exact match: \d/5", r.stdout)
    assert out.exists()
    with Image.open(out) as im:
        im.load()
        w, h = im.size
        assert im.format == "PNG"
        # 4 columns of 160 px cells, 2 rows: a sensible picture, not a sliver or a poster
        assert 400 <= w <= 1200 and 300 <= h <= 1500, (w, h)
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colors) > 3  # images and text were drawn, not a blank canvas
    # the grid with --image too
    out2 = tmp_path / "one.png"
    r = run_sample(f"--ckpt={setup['ckpt']}", f"--image={setup['photo']}", f"--grid={out2}", "--max_new_tokens=2")
    assert r.returncode == 0, r.stderr
    with Image.open(out2) as im:
        assert im.size[0] >= 160 and im.size[1] >= 160


def test_missing_ckpt_is_a_clear_error(setup, tmp_path):
    missing = tmp_path / "nope" / "ckpt.pt"
    r = run_sample(f"--ckpt={missing}", f"--image={setup['photo']}")
    assert r.returncode != 0
    assert "checkpoint not found" in r.stderr and str(missing) in r.stderr, r.stderr


def test_missing_ckpt_without_traceback(setup, tmp_path):
    r = run_sample(f"--ckpt={tmp_path / 'nope.pt'}", f"--image={setup['photo']}")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr


def test_missing_image_is_a_clear_error(setup, tmp_path):
    r = run_sample(f"--ckpt={setup['ckpt']}", f"--image={tmp_path / 'none.png'}")
    assert r.returncode != 0
    assert "none.png" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_unknown_argument(setup):
    r = run_sample(f"--ckpt={setup['ckpt']}", "--imgae=x.png")
    assert r.returncode != 0 and "unknown setting --imgae (did you mean --image?)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
