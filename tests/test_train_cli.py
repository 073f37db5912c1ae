"""
train.py end to end, as a subprocess with a tiny model on a tiny dataset made in a temp folder:
exact resume, two-process DDP (gloo, CPU), adaptation with frozen groups, clear failures on an
incompatible resume and an unknown setting, and the blind baseline.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_color_dataset

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--n_vis_layer=1", "--n_vis_embd=32", "--n_vis_head=2",
        "--image_size=16", "--patch_size=8", "--batch_size=4", "--max_iters=6", "--eval_interval=3",
        "--eval_items=4", "--num_show=1", "--log_interval=1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return str(write_color_dataset(tmp_path_factory.mktemp("data"), n_train=16, n_val=4))


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def train(*args, dataset, out_dir, check=True, timeout=120):
    cmd = [sys.executable, "train.py", *TINY, f"--dataset={dataset}", f"--out_dir={out_dir}", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"train.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_train(records):
    return [r for r in records if "loss" in r][-1]


def final(records):
    """The last final-evaluation record (a stopped-then-resumed run has one per run)."""
    fin = [r for r in records if r.get("final")]
    assert fin, records
    return fin[-1]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# -----------------------------------------------------------------------------


def test_resume_is_exact(dataset, tmp_path):
    # a schedule that matters over the 6 steps (warm-up, then cosine decay to step 6)
    sched = ["--warmup_iters=2", "--lr_decay_iters=6", "--learning_rate=1e-2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(*sched, dataset=dataset, out_dir=straight)
    train(*sched, "--max_iters=3", dataset=dataset, out_dir=split)
    first = read_log(split)
    assert last_train(first)["step"] == 3
    assert load(split / "ckpt.pt")["step"] == 3
    r = train(*sched, "--resume=True", dataset=dataset, out_dir=split)
    assert "resumed" in r.stdout
    a, b = read_log(straight), read_log(split)
    # the resumed log continues the first half's
    steps_b = [x["step"] for x in b if "loss" in x]
    assert steps_b == [1, 2, 3, 4, 5, 6]
    losses_a = {x["step"]: x["loss"] for x in a if "loss" in x}
    losses_b = {x["step"]: x["loss"] for x in b if "loss" in x}
    assert losses_a == losses_b  # every step, exactly
    assert last_train(a)["step"] == last_train(b)["step"] == 6
    assert last_train(a)["loss"] == last_train(b)["loss"]
    assert [x["step"] for x in b if x.get("final")] == [3, 6]
    assert final(a)["val_loss"] == final(b)["val_loss"]
    # the loss did move (so equality means something)
    assert losses_a[1] != losses_a[6]
    # the same weights, bit for bit
    ma, mb = load(straight / "ckpt.pt")["model"], load(split / "ckpt.pt")["model"]
    assert ma.keys() == mb.keys()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo(dataset, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "train.py", *TINY,
           "--max_iters=4", "--eval_interval=2", f"--dataset={dataset}", f"--out_dir={out}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    records = read_log(out)
    assert last_train(records)["step"] == 4
    assert final(records)["n_answers"] == 4
    ck = load(out / "ckpt.pt")
    assert ck["step"] == 4
    assert len(ck["rng"]) == 2  # the RNG states of both processes
    # the two processes drew different batches (own data generators)
    assert not torch.equal(ck["rng"][0]["data"], ck["rng"][1]["data"])
    assert "2 process(es)" in r.stdout


def test_adaptation_freezes_and_inits_ca_from_sa(dataset, tmp_path):
    ins = tmp_path / "ins"
    train("--variant=insertion", dataset=dataset, out_dir=ins)
    src = load(ins / "ckpt.pt")
    assert src["config"]["variant"] == "insertion"
    src_model = src["model"]

    def adapt(out, *extra):
        train(f"--init_from={ins / 'ckpt.pt'}", "--variant=ca", "--freeze=vision,text", "--warmup_iters=0",
              *extra, dataset=dataset, out_dir=out)
        ck = load(out / "ckpt.pt")
        assert ck["config"]["variant"] == "ca"
        return ck["model"]

    at0 = adapt(tmp_path / "adapt0", "--max_iters=0")
    after = adapt(tmp_path / "adapt6")
    ca_names = [k for k in after if ".ca." in k]
    assert ca_names, list(after)
    new = [k for k in after if ".ca." in k or ".ln_ca." in k]
    old = [k for k in after if k not in new]
    # everything but the CA layers comes from the insertion checkpoint
    assert all(k in src_model and src_model[k].shape == after[k].shape for k in old), \
        [k for k in old if k not in src_model]
    # step 0: copied weights equal, CA = the same block's SA
    for k in old:
        assert torch.equal(at0[k], src_model[k]), k
    for k in ca_names:
        sa = k.replace(".ca.", ".sa.")
        assert torch.equal(at0[k], src_model[sa]), k
    # after training: the frozen weights are bit-identical to the insertion checkpoint's...
    for k in old:
        assert torch.equal(after[k], src_model[k]), f"frozen {k} changed"
    # ...and the CA weights moved away from their SA initialisation
    unchanged = [k for k in ca_names if torch.equal(after[k], at0[k])]
    assert not unchanged, f"CA parameters not trained: {unchanged}"
    assert any(not torch.equal(after[k], src_model[k.replace(".ca.", ".sa.")]) for k in ca_names)


@pytest.fixture(scope="module")
def small_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("small_run")
    train("--max_iters=2", "--eval_interval=100", dataset=dataset, out_dir=out)
    return out


@pytest.mark.parametrize("clash, name", [("--n_embd=64", "n_embd"), ("--variant=insertion", "variant")])
def test_resume_incompatible_config_fails_clearly(dataset, small_run, clash, name):
    out = small_run
    before = (out / "ckpt.pt").read_bytes()
    r = train("--resume=True", clash, dataset=dataset, out_dir=out, check=False)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert "cannot resume" in r.stderr and name in r.stderr, r.stderr
    assert (out / "ckpt.pt").read_bytes() == before  # the checkpoint is left alone


def test_resume_without_checkpoint_fails_clearly(dataset, tmp_path):
    r = train("--resume=True", dataset=dataset, out_dir=tmp_path / "empty", check=False)
    assert r.returncode != 0 and "no checkpoint" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_blind_runs(dataset, tmp_path):
    out = tmp_path / "blind"
    r = train("--blind=True", "--max_iters=3", dataset=dataset, out_dir=out)
    assert "BLIND" in r.stdout
    records = read_log(out)
    assert final(records)["n_answers"] == 4
    assert load(out / "ckpt.pt")["train_args"]["blind"] is True


def test_unknown_setting_fails_clearly(dataset, tmp_path):
    r = train("--n_layers=2", dataset=dataset, out_dir=tmp_path / "x", check=False)
    assert r.returncode != 0
    assert "unknown setting --n_layers" in r.stderr and "--n_layer" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()  # failed before doing anything
    r = train("--n_layer=two", dataset=dataset, out_dir=tmp_path / "x", check=False)
    assert r.returncode != 0 and "--n_layer takes a int" in r.stderr, r.stderr
