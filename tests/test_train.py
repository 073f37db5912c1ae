"""train.py end to end, as subprocesses on a tiny model and a tiny dataset in a temp folder: settings
checks, a run with its log and final line, exact resume, refused resumes, vision pretraining,
adaptation with frozen groups, two processes under torchrun (gloo on CPU), CASA (ca_tv) and
the blind baseline. Each train.py process costs seconds (importing torch), so one run serves
several checks where it can: the suite's time is mostly these processes. Bad settings, refused
out_dirs and faults (signals, a full disk, a torn log) are test_bad_input_train.py's."""

import ast
import math
import os

import pytest
import torch
from conftest import TINY_MODEL, read_log, run, write_tiny_dataset

import casa



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"))


def train(data, out, *args, check=True):
    return run("train.py", *TINY_MODEL, f"--dataset={data}", f"--out_dir={out}", *args, check=check)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# dropout on, so the torch RNG state matters to an exact resume; evals in between must not disturb it
RESUMABLE = ["--dropout=0.1", "--lr_decay_iters=8", "--eval_interval=3"]


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """An 8-step run: its log and checkpoint, and the uninterrupted half of the resume test."""
    out = tmp_path_factory.mktemp("base")
    r = train(data, out, *RESUMABLE, "--max_iters=8")
    return out, r


def test_settings_are_checked(data, tmp_path):
    # the parsing itself is test_configurator's, the ranges test_bad_input_train's; here: train.py
    # parses before doing anything
    r = train(data, tmp_path / "x", "--n_layers=3", check=False)
    assert r.returncode != 0 and "unknown setting --n_layers (did you mean --n_layer?)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()


def test_run_logs_metrics_and_final_line(base):
    out, r = base
    assert "final: val_loss=" in r.stdout and "accuracy=" in r.stdout
    assert "threads: 1 (OMP_NUM_THREADS; --threads=N to set)" in r.stdout  # conftest.run sets it
    assert "validation samples:" in r.stdout
    log = read_log(out)
    steps = [x for x in log if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(x["tok_per_s"] > 0 and x["mfu"] > 0 for x in steps)
    evals = [x for x in log if "val_loss" in x]
    assert [x["step"] for x in evals] == [3, 6, 8]
    final = evals[-1]
    assert final["final"] and final["summary"].startswith("final: val_loss=")
    assert set(final["accuracy_by_task"]) == {"color", "pair"}  # per task when several
    assert final["n_answers"] == 8  # 4 single-turn + 2 two-turn val samples
    ck = load(out / "ckpt.pt")
    assert ck["step"] == 8 and ck["config"]["variant"] == "ca" and ck["train_args"]["max_iters"] == 8
    assert {"model", "optimizer", "rng", "train_args", "dataset_dir"} <= set(ck)
    assert {"python", "numpy", "torch", "data"} <= set(ck["rng"][0])
    # focus_errors: a running error rate per question kind, kept for resuming; each eval logs the draw
    assert len(ck["kind_errors"]) >= 2 and all(0 <= e <= 1 for e in ck["kind_errors"])
    shares = [x["kind_share"] for x in evals if not x.get("final")]
    assert shares and all(len(s) == len(ck["kind_errors"]) and sum(s.values()) == pytest.approx(1, abs=0.01) for s in shares)
    # the default optimizer: Muon holds a state for each linear layer's weight matrix, AdamW for the rest
    model = casa.VLM(casa.Config(**casa.checkpoint_config(ck["config"])))
    n_matrices = sum(isinstance(m, torch.nn.Linear) for m in model.modules()) - 1  # the head is the embedding
    assert len(ck["muon"]["state"]) == n_matrices > 0
    assert len(ck["optimizer"]["state"]) == len(list(model.parameters())) - n_matrices


def test_resume_is_exact(base, data, tmp_path):
    straight, _ = base
    train(data, tmp_path, *RESUMABLE, "--max_iters=4")
    trained_s = load(tmp_path / "ckpt.pt")["train_s"]
    assert trained_s == pytest.approx(read_log(tmp_path)[-1]["train_s"], abs=0.01)  # the final line's train_s
    ck = load(tmp_path / "ckpt.pt")
    ck["wall_s"] = 1000.0  # as if the first part had taken 1000 s of wall time
    torch.save(ck, tmp_path / "ckpt.pt")
    r = train(data, tmp_path, "--resume=True", "--max_iters=8")
    assert "resumed" in r.stdout
    a = {x["step"]: x["loss"] for x in read_log(straight) if "loss" in x}
    b = {x["step"]: x["loss"] for x in read_log(tmp_path) if "loss" in x}
    assert list(b) == list(range(1, 9)) and a == b  # every step logged once, each loss exactly
    assert a[1] != a[8]  # the loss did move, so the equality means something
    # training time goes on from the checkpoint's, not from zero
    assert all(x["train_s"] > trained_s for x in read_log(tmp_path) if "train_s" in x and x["step"] > 4)
    # one final evaluation per part, the last one the uninterrupted run's
    finals = [x for x in read_log(tmp_path) if x.get("final")]
    assert [x["step"] for x in finals] == [4, 8]
    assert 1000 < finals[-1]["wall_s"] < 1000 + 600  # wall time, like training time, goes on from the checkpoint's
    assert finals[-1]["val_loss"] == [x for x in read_log(straight) if x.get("final")][-1]["val_loss"]
    wa, wb = load(straight / "ckpt.pt")["model"], load(tmp_path / "ckpt.pt")["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_vision_pretraining_trains_the_encoder_only(data, tmp_path):
    """Stage 1 (--vision_pretrain_iters): the encoder learns to redraw the training images, nothing
    else moves. Against the same run without it (same seed, no VLM steps): every vision tensor
    differs, every other tensor is bit-identical; the log has its reconstruction records."""
    no_steps = ["--max_iters=0", "--epochs=0", "--min_iters=0"]  # a budget of 0 VLM steps
    train(data, tmp_path / "plain", *no_steps)
    train(data, tmp_path / "stage1", *no_steps, "--vision_pretrain_iters=12")
    plain, stage1 = load(tmp_path / "plain" / "ckpt.pt")["model"], load(tmp_path / "stage1" / "ckpt.pt")["model"]
    for k in plain:
        if k.startswith("vision."):
            assert not torch.equal(plain[k], stage1[k]), f"{k} was not pretrained"
        else:
            assert torch.equal(plain[k], stage1[k]), f"{k} changed in vision pretraining"
    records = [x for x in read_log(tmp_path / "stage1") if x.get("stage") == "vision"]
    assert [x["step"] for x in records] == [10, 12] and all(x["mse"] > 0 for x in records)
    assert not [x for x in read_log(tmp_path / "plain") if x.get("stage") == "vision"]


@pytest.fixture(scope="module")
def insertion(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("insertion")
    train(data, out, "--variant=insertion", "--max_iters=4", "--eval_interval=100")
    return out / "ckpt.pt"


@pytest.mark.parametrize("variant, freeze", [("ca", "vision_but_last,text"), ("ca_replace", "pretrained")])
def test_adaptation_trains_only_what_is_not_frozen(insertion, data, tmp_path, variant, freeze):
    src = load(insertion)["model"]
    r = train(data, tmp_path, f"--init_from={insertion}", f"--variant={variant}", f"--freeze={freeze}",
              "--max_iters=4", "--eval_interval=100", "--lr_new=1e-2")
    assert "tensors copied" in r.stdout
    ck = load(tmp_path / "ckpt.pt")
    assert ck["config"]["variant"] == variant and ck["config"]["n_embd"] == 32
    after = ck["model"]
    new = [k for k in after if ".ca." in k or ".ln_ca." in k]
    assert new
    if freeze == "pretrained":
        trainable = set(new)
    else:  # the last vision block and the head after it stay trainable, with the CA layers
        trainable = set(new) | {k for k in after if k.startswith(("vision.blocks.1.", "vision.ln_f", "vision.proj",
                                                                   "vision.ln_out"))}
    for k, t in after.items():
        if k in trainable:
            assert k in new or not torch.equal(t, src[k]), f"{k} should have been trained"
        else:
            assert torch.equal(t, src[k]), f"frozen {k} changed"
    # the CA projections started from the same layer's SA weights, and then moved
    for k in [k for k in new if ".ca." in k]:
        assert not torch.equal(after[k], src[k.replace(".ca.", ".sa.")]), k
    assert sorted(ck["pretrained"]) == sorted(k for k in after if k not in new and k != "lm_head.weight")


@pytest.mark.slow
def test_torchrun_two_processes(data, tmp_path):
    r = run("torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *TINY_MODEL,
            f"--dataset={data}", f"--out_dir={tmp_path}", "--max_iters=4", "--eval_interval=2",
            "--vision_pretrain_iters=2", module=True)  # stage 1's hand-averaged gradients too
    assert "2 process(es)" in r.stdout and "final: val_loss=" in r.stdout
    assert r.stdout.count("final: ") == 1  # printed by rank 0 only
    ck = load(tmp_path / "ckpt.pt")
    assert ck["step"] == 4 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["data"], ck["rng"][1]["data"])  # each process its own batches
    assert [x["step"] for x in read_log(tmp_path) if "loss" in x] == [1, 2, 3, 4]


def test_casa_trains_and_evaluates(data, tmp_path):
    # ca, insertion, ca_replace run above; train.py has no variant-specific code, and every variant's
    # forward, gradients, FLOPs and generation are checked in-process in test_model.py
    r = train(data, tmp_path, "--variant=ca_tv", "--max_iters=2", "--eval_interval=100")
    assert "model ca_tv:" in r.stdout and "final: val_loss=" in r.stdout


def test_blind_baseline_runs_and_is_marked(data, tmp_path):
    r = train(data, tmp_path, "--blind=True", "--max_iters=3", "--eval_interval=100")
    assert "BLIND" in r.stdout
    # that the images are blank is test_loader's (a 3-step model answers alike with or without them)
    assert [x for x in read_log(tmp_path) if x.get("final")][-1]["n_answers"] == 8
    assert load(tmp_path / "ckpt.pt")["train_args"]["blind"] is True


def test_budget_and_image_size_follow_the_data(data, tmp_path):
    # max_iters=0: `epochs` passes over the 18 training samples at 4 a step, at least min_iters steps;
    # image_size=0: the images' size (20 px) rounded down to a multiple of 16, at least 32; patch 1/4 of it.
    # Balanced sampling on, to run through it.
    # The vision stage (-1): a fifth of the steps (2), at least min_iters // 3 (3).
    r = train(data, tmp_path, "--max_iters=0", "--epochs=3", "--min_iters=9", "--image_size=0", "--patch_size=0",
              "--balance_kinds=True", "--vision_pretrain_iters=-1", "--eval_interval=100")
    assert "budget: 14 steps of 4 samples = 3.1 passes" in r.stdout, r.stdout
    assert "stage 1: 3 steps of label-free vision pretraining" in r.stdout
    assert "images: 20 px -> image_size 32, patch_size 8: 16 tokens per image" in r.stdout, r.stdout
    ck = load(tmp_path / "ckpt.pt")
    assert ck["step"] == 14 and ck["train_args"]["max_iters"] == 14  # saved resolved: a resume keeps them
    assert ck["train_args"]["vision_pretrain_iters"] == 3 and [x["step"] for x in read_log(tmp_path) if x.get("stage")] == [3]
    assert ck["config"]["image_size"] == 32 and ck["train_args"]["patch_size"] == 8
    r = train(data, tmp_path / "b", "--max_iters=0", "--epochs=1", "--min_iters=7", "--eval_interval=100")
    assert "budget: 7 steps" in r.stdout and load(tmp_path / "b" / "ckpt.pt")["step"] == 7


def test_fitted_patch_is_8_px_up_to_64_px_then_64_tokens():
    fitted_patch = train_py_class("fitted_patch")
    # image side -> (patch, tokens): 8 px patches from 32 to 64 px, then at most 64 tokens; a quarter
    # of the side below 32; always a power of 2 that divides the multiples of 16 the rule picks
    expected = {16: (4, 16), 32: (8, 16), 48: (8, 36), 64: (8, 64), 80: (16, 25), 96: (16, 36), 128: (16, 64),
                256: (32, 64)}
    got = {side: (fitted_patch(side), (side // fitted_patch(side)) ** 2) for side in expected}
    assert got == expected
    for side in range(16, 129, 16):  # the sizes the image-size rule picks (32 to 64) and a user's up to 128
        p = fitted_patch(side)
        assert p & (p - 1) == 0 and side % p == 0 and (side // p) ** 2 <= 64 and p <= max(8, side // 4)


def train_py_class(name):
    """One class (or function) of train.py, alone: the script trains when imported, so its source is
    read and only that definition is run (with the modules train.py imports)."""
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")) as f:
        tree = ast.parse(f.read())
    node = next(n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == name)
    scope = dict(casa=casa, torch=torch, nn=torch.nn, math=math)
    exec(compile(ast.Module([node], type_ignores=[]), "train.py", "exec"), scope)
    return scope[name]


def test_image_decoder_puts_each_token_in_its_patch():
    """train.py's ImageDecoder (stage 1): token r*g + c becomes the pixels of patch (r, c), channel
    first. Reference: the decoder's own per-token output, placed patch by patch in a loop."""
    torch.manual_seed(0)
    config = casa.Config(n_embd=32, n_head=2, image_size=16, patch_size=4)
    dec = train_py_class("ImageDecoder")(config)
    tokens = torch.randn(2, 16, 32)
    out = dec(tokens)
    per_token = dec.to_pixels(dec.block(tokens))  # (2, 16, 4*4*3)
    want = torch.zeros(2, 3, 16, 16)
    for r in range(4):
        for c in range(4):
            want[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = per_token[:, 4 * r + c].view(2, 4, 4, 3).permute(0, 3, 1, 2)
    assert out.shape == (2, 3, 16, 16) and torch.equal(out, want)


def test_table5_settings_reach_the_model(data, tmp_path):
    """The Table 5 settings reach the model (compressed insertion, Q = 2; --ca_every goes the same way,
    and both models are checked against the naive reference in test_model.py)."""
    out = train(data, tmp_path / "q2", "--variant=insertion", "--compress_queries=2", "--max_iters=2", "--num_show=0").stdout
    assert load(tmp_path / "q2" / "ckpt.pt")["config"]["compress_queries"] == 2 and "2 tokens enter the text" in out
