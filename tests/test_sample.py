"""sample.py on a tiny checkpoint saved the way train.py saves it: one image with a prompt (greedy
answer equal to the model's own), validation samples, sampling with temperature, the --grid picture."""

import re

import pytest
import torch
from conftest import run, write_tiny_dataset
from PIL import Image

import casa
from data.loader import answer

S = 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    data = write_tiny_dataset(d / "data")
    torch.manual_seed(0)
    config = casa.Config(n_layer=2, n_head=2, n_embd=32, n_vis_layer=1, n_vis_head=2, n_vis_embd=32, image_size=S,
                         patch_size=8, block_size=64)
    model = casa.VLM(config)
    path = d / "ckpt.pt"
    casa.save_checkpoint(path, model, step=0, train_args={"dataset": str(data), "blind": False},
                         dataset_dir=str(data))
    Image.new("RGBA", (40, 25), (10, 200, 30, 255)).save(d / "odd.png")  # any size and mode
    return path, d / "odd.png", model


def test_one_image_with_a_prompt(ckpt):
    path, img, model = ckpt
    r = run("sample.py", f"--ckpt={path}", f"--image={img}", "--prompt=what color?", "--max_new_tokens=6")
    m = re.search(r"\[0\] '<img>what color\?' -> (.*)", r.stdout)
    assert m, r.stdout
    # the same greedy answer as the model itself gives
    tok = casa.get_tokenizer()
    ids, _ = casa.encode_turn(tok, casa.IMAGE + "what color?")
    images = casa.load_image(img, S)[None]
    assert m.group(1) == repr(answer(model, torch.tensor([ids]), images, tok, 6)[0])


def test_validation_samples_and_grid(ckpt, tmp_path):
    path, _, _ = ckpt
    out = tmp_path / "grid.png"
    r = run("sample.py", f"--ckpt={path}", "--num_samples=5", f"--grid={out}", "--max_new_tokens=4")
    assert "5 of 8 val answers" in r.stdout and "exact match:" in r.stdout
    assert len(re.findall(r"truth=.* pred=", r.stdout)) == 5
    pic = Image.open(out)
    assert pic.width >= 4 * 160 and pic.height >= 2 * 160  # 4 columns, 2 rows, images upscaled


def test_temperature_sampling_and_grid_with_image(ckpt, tmp_path):
    path, img, _ = ckpt
    out = tmp_path / "one.png"
    r = run("sample.py", f"--ckpt={path}", f"--image={img}", "--temperature=1.0", "--top_k=5", "--num_samples=3",
            "--seed=1", f"--grid={out}", "--max_new_tokens=4")
    assert len(re.findall(r"^\[\d\] '<img>describe the image.' -> ", r.stdout, re.M)) == 3
    assert Image.open(out).size[0] >= 160


def test_clear_errors(ckpt, tmp_path):
    path, _, _ = ckpt
    r = run("sample.py", f"--ckpt={path}", f"--image={tmp_path / 'nope.png'}", check=False)
    assert r.returncode != 0 and "image file not found" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run("sample.py", f"--ckpt={path}", f"--image={tmp_path / 'nope.png'}", "--prompt=<|image|><|image|>",
            check=False)
    assert r.returncode != 0
    r = run("sample.py", f"--ckpt={tmp_path / 'missing.pt'}", check=False)
    assert r.returncode != 0 and "checkpoint not found" in r.stderr
    r = run("sample.py", "--tempreature=1", check=False)
    assert r.returncode != 0 and "unknown setting --tempreature (did you mean --temperature?)" in r.stderr
