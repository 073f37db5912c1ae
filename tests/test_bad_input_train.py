"""train.py against bad input and faults, as a hostile new user meets them: every refusal is one line
starting 'error:', a non-zero exit and no traceback, and no earlier run is ever lost.

The table of bad settings runs in ONE Python process (RUNNER below runs train.py once per row, as
`python train.py ...` would, with runpy): each row fails in milliseconds before any data is read, while
a process of its own would cost seconds of importing torch. The faults that need a real process (a
signal, a lock held by another process, a run that trains) run as subprocesses; casa's checkpoint
functions are tested in-process."""

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TINY_MODEL, read_log, run, write_tiny_dataset

import casa

# runs train.py once per argv list in sys.argv[1] (JSON), in this one process; prints [{rc, stderr}]
# as JSON. An exception that escapes train.py is printed as the interpreter would: a traceback.
RUNNER = r"""
import contextlib, io, json, runpy, sys, traceback
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv, err, rc = ["train.py", *argv], io.StringIO(), 0
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            runpy.run_path("train.py", run_name="__main__")
        except SystemExit as e:  # sys.exit("message") prints it and exits 1, as the interpreter does
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            rc = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
            rc = 1
    results.append({"rc": rc, "stderr": err.getvalue()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"))


def refusals(data, tmp_path, cases):
    """Run train.py on each (args, expected message) of `cases` (one process for all), each into an out_dir
    of its own under tmp_path unless the args name one; assert each gives exactly one line, an 'error:'
    holding the expected message, a non-zero exit and no traceback."""
    argvs = [[*TINY_MODEL, f"--dataset={data}", f"--out_dir={tmp_path / f'case{i}'}", *args]
             for i, (args, _) in enumerate(cases)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(argvs)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout.splitlines()[-1])
    for (args, want), got in zip(cases, results):
        lines = got["stderr"].strip().splitlines()
        assert "Traceback" not in got["stderr"], (args, got["stderr"])
        assert got["rc"] != 0 and len(lines) == 1 and lines[0].startswith("error: "), (args, got)
        assert want in lines[0], (args, want, lines[0])
    return results


BAD_SETTINGS = [  # (arguments, what the one-line error says); none of them may create its out_dir
    (["--batch_size=0"], "--batch_size must be in [1, 65536], got 0"),
    (["--grad_accum=0"], "--grad_accum must be in [1, 65536], got 0"),
    (["--eval_interval=0"], "--eval_interval must be >= 1, got 0"),
    (["--log_interval=0"], "--log_interval must be >= 1, got 0"),
    (["--eval_items=-1"], "--eval_items must be >= 0, got -1"),
    (["--max_iters=-5"], "--max_iters must be >= 0, got -5"),
    (["--epochs=-1"], "--epochs must be >= 0, got -1.0"),
    (["--vision_pretrain_iters=-2"], "--vision_pretrain_iters must be >= -1, got -2"),
    (["--learning_rate=-3e-4"], "--learning_rate must be > 0, got -0.0003"),
    (["--lr_new=0"], "--lr_new must be > 0, got 0.0"),
    (["--learning_rate=1e999"], "--learning_rate must be a finite number > 0, got inf"),
    (["--weight_decay=-0.1"], "--weight_decay must be >= 0, got -0.1"),
    (["--dropout=1.5"], "--dropout must be in [0, 1), got 1.5"),
    (["--variant=insertion", "--ca_every=2"], "ca_every (2) must be >= 1, and > 1 only for the CA variants"),
    (["--variant=ca", "--compress_queries=4"], "compress_queries (4) must be >= 0, and > 0 only for insertion"),
    (["--beta2=1.0"], "--beta2 must be in [0, 1), got 1.0"),
    (["--seed=-1"], "--seed must be in [0, "),
    (["--threads=-1"], "--threads must be in [0, 1024], got -1"),
    (["--n_layer=0"], "--n_layer must be in [1, 1024], got 0"),
    (["--n_embd=30"], "n_embd (30) must split into n_head (2) heads"),
    (["--image_size=5000"], "--image_size must be in [0, 1024], got 5000"),
    (["--patch_size=3"], "patch_size (3) must be a power of 2"),
    (["--variant=nope"], "unknown variant 'nope'"),
    (["--optimizer=sgd"], "--optimizer=sgd is not one of muon, adamw"),
    (["--muon_lr=0"], "--muon_lr must be > 0, got 0.0"),
    (["--device=banana"], "unknown device 'banana'"),
    (["--device=cuda:99"], "device 'cuda:99', but"),
    (["--out_dir="], "--out_dir is empty"),
    (["--resume=True", "--overwrite=True"], "choose one"),
    (["--resume=True"], "--resume=True but there is no checkpoint at"),
    (["--init_from=nowhere/ckpt.pt"], "checkpoint not found: nowhere/ckpt.pt"),
]


def tiny_checkpoint(path, **config):
    """A small checkpoint as train.py writes it (step 8), its config changed by `config`."""
    model = casa.VLM(casa.Config(n_layer=2, n_head=2, n_embd=32, n_vis_layer=2, n_vis_head=2, n_vis_embd=32,
                                 image_size=16, patch_size=8))
    path.parent.mkdir(parents=True, exist_ok=True)
    casa.save_checkpoint(str(path), model, step=8, optimizer={}, train_args={"max_iters": 8}, rng=[])
    if config:
        ck = torch.load(path, weights_only=True)
        ck["config"].update(config)
        torch.save(ck, path)
    return path


def test_bad_settings_and_refused_out_dirs(data, tmp_path):
    """Every bad setting, and every out_dir train.py must not write to, in one process: one line each,
    before anything is written."""
    kept = tiny_checkpoint(tmp_path / "kept" / "ckpt.pt")  # a run a fresh one must not replace
    (kept.parent / "log.jsonl").write_text('{"step": 8, "loss": 1.0}\n')
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (kept, kept.parent / "log.jsonl")}
    busy = tmp_path / "busy"  # a run in progress: this process holds the lock, as a running train.py does
    busy.mkdir()
    lock = open(busy / "train.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    huge = tiny_checkpoint(tmp_path / "huge" / "ckpt.pt", n_layer=100000)  # would allocate without bound
    wide = tiny_checkpoint(tmp_path / "wide" / "ckpt.pt", n_embd=4096)  # sizes its weights do not have
    odd = tiny_checkpoint(tmp_path / "odd" / "ckpt.pt", n_experts=8)  # a config from another casa.py
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    cases = BAD_SETTINGS + [
        ([f"--out_dir={kept.parent}"], f"{kept} already holds a run (step 8, saved "),
        ([f"--out_dir={kept.parent}", "--max_iters=-5"], "--max_iters must be >= 0"),
        ([f"--out_dir={kept.parent}", "--resume=True", "--n_embd=64"], "n_embd=32 (this run asks for 64)"),
        # a checkpoint from before Muon holds AdamW's state only
        ([f"--out_dir={kept.parent}", "--resume=True", "--optimizer=muon"], "it was trained with --optimizer=adamw"),
        ([f"--out_dir={busy}"], f"another train.py (pid {os.getpid()}) is running in {busy}"),
        ([f"--out_dir={a_file}"], "is a file, not a folder"),
        ([f"--out_dir={huge.parent}", "--resume=True"], "n_layer=100000, not a size from 1 to 1024"),
        ([f"--out_dir={wide.parent}", "--resume=True"], "size mismatch between its config and its weights"),
        ([f"--out_dir={odd.parent}", "--resume=True"], "saved with a config this casa.py does not know"),
        (["--freeze=everything"], "unknown group 'everything'"),  # checked once the model is built
    ]
    results = refusals(data, tmp_path, cases)
    assert "--resume=True" in results[len(BAD_SETTINGS)]["stderr"]  # the message offers both ways on
    assert "--overwrite=True" in results[len(BAD_SETTINGS)]["stderr"]
    assert not [i for i in range(len(BAD_SETTINGS)) if (tmp_path / f"case{i}").exists()]  # nothing written
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before  # the earlier run untouched
    lock.close()


def test_overwrite_replaces_a_run_and_a_dead_runs_leftovers_go(data, tmp_path):
    """--overwrite=True trains over an earlier run; the lock file of a run killed with kill -9 (a pid
    that is gone) is taken over, and the temporary file of a save it was in the middle of removed."""
    tiny_checkpoint(tmp_path / "ckpt.pt")
    (tmp_path / "log.jsonl").write_text('{"step": 8, "loss": 1.0}\n')
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "train.lock").write_text(f"{dead.pid}\n")
    (tmp_path / f"ckpt.pt.tmp{dead.pid}").write_bytes(b"half a checkpoint")
    r = run("train.py", *TINY_MODEL, f"--dataset={data}", f"--out_dir={tmp_path}", "--overwrite=True",
            "--max_iters=2", "--eval_interval=100")
    assert "Traceback" not in r.stderr and "final: val_loss=" in r.stdout
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    assert [x["step"] for x in read_log(tmp_path) if "loss" in x] == [1, 2]  # a fresh log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "log.jsonl", "train.lock"]


def test_sigterm_saves_and_exits_143_and_a_torn_log_line_resumes(data, tmp_path):
    """SIGTERM (a timeout, SLURM, docker stop) mid-run: the step finishes, a checkpoint is written, the
    exit code is 143. A run killed while writing its log leaves a torn last line: --resume drops it with
    a warning. The resume also raises block_size (no weight depends on it), as the data error suggests."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    cmd = [sys.executable, "train.py", *TINY_MODEL, f"--dataset={data}", f"--out_dir={tmp_path}",
           "--max_iters=100000", "--eval_interval=100000", "--block_size=40"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_path = tmp_path / "log.jsonl"
    t0 = time.time()
    while not (log_path.exists() and log_path.read_text().strip()) and time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, (proc.returncode, err[-2000:])
    step = torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"]
    assert step >= 1 and f"stopped at step {step}; checkpoint" in out
    assert not list(tmp_path.glob("ckpt.pt.tmp*"))

    with open(log_path, "a") as f:
        f.write('{"step": %d, "loss": 0.9' % (step + 1))  # killed mid-line
    longer = write_tiny_dataset(tmp_path / "longer")  # a sample longer than the checkpoint's block_size
    rows = (longer / "train.jsonl").read_text().splitlines()
    rows[0] = json.dumps(dict(json.loads(rows[0]), prompt="what colour is this, exactly? " * 2))
    (longer / "train.jsonl").write_text("\n".join(rows) + "\n")
    r = run("train.py", f"--dataset={longer}", f"--out_dir={tmp_path}", "--resume=True", "--block_size=80",
            f"--max_iters={step + 1}")
    assert "Traceback" not in r.stderr and f"log.jsonl:{step + 1}: dropped a last line cut short" in r.stdout
    assert "block_size 80" in r.stdout and "final: val_loss=" in r.stdout
    assert [x["step"] for x in read_log(tmp_path) if "loss" in x] == list(range(1, step + 2))


# -----------------------------------------------------------------------------
# casa's checkpoint functions, in-process


def test_a_failed_save_leaves_no_partial_file_and_a_full_disk_says_so(tmp_path, monkeypatch):
    model = casa.VLM(casa.Config(n_layer=1, n_head=2, n_embd=16, n_vis_layer=1, n_vis_head=2, n_vis_embd=16,
                                 image_size=8, patch_size=4))
    path = tmp_path / "ckpt.pt"
    casa.save_checkpoint(str(path), model, step=1)
    before = path.read_bytes()
    real_save = torch.save

    def save_then_fail(error):
        def save(obj, f):
            real_save(obj, f)  # a partial file, as a full disk leaves it
            raise error
        return save

    full_disk = [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("basic_ios::clear: iostream error")]
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: SimpleNamespace(free=0))  # the disk is full
    for error in full_disk:
        monkeypatch.setattr(torch, "save", save_then_fail(error))
        with pytest.raises(OSError, match=f"no space left on device: {path} not written") as e:
            casa.save_checkpoint(str(path), model, step=2)
        assert e.value.errno == errno.ENOSPC and str(tmp_path) in str(e.value)
        assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"] and path.read_bytes() == before
    # Ctrl-C or SIGTERM during the save, or an error with room on the disk: raised as it was, no file left
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: SimpleNamespace(free=10**12))
    for error in [KeyboardInterrupt(), SystemExit(143), RuntimeError("basic_ios::clear: iostream error")]:
        monkeypatch.setattr(torch, "save", save_then_fail(error))
        with pytest.raises(type(error)):
            casa.save_checkpoint(str(path), model, step=2)
        assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"] and path.read_bytes() == before


def test_load_checkpoint_checks_the_config_before_building_a_model(tmp_path, monkeypatch):
    """A config that names sizes out of bounds, or other than its weights', is refused before any model
    is built (casa.VLM is not called), so a damaged file cannot make the loader allocate without bound."""
    cases = [(dict(n_layer=100000), ValueError, "n_layer=100000, not a size from 1 to 1024"),
             (dict(n_embd=-4), ValueError, "n_embd=-4, not a size"),
             (dict(image_size="big"), ValueError, "image_size='big'"),
             (dict(n_layer=1000), RuntimeError, "n_layer=1000 by the config, 2 blocks in the file"),
             (dict(n_embd=8192, n_head=2), RuntimeError, "wte.weight is (259, 32) in the file, (259, 8192) by the config"),
             (dict(n_vis_embd=4096), RuntimeError, "vision.proj.weight is (32, 32) in the file"),
             (dict(image_size=1024), RuntimeError, "vision.row_emb is (2, 1, 32) in the file, (128, 1, 32)"),
             (dict(vocab_size=1 << 20), RuntimeError, "size mismatch")]
    paths = [tiny_checkpoint(tmp_path / f"{i}" / "ckpt.pt", **config) for i, (config, _, _) in enumerate(cases)]

    def no_model(config):
        raise AssertionError(f"a model was built for {config}")

    monkeypatch.setattr(casa, "VLM", no_model)
    for path, (config, error, says) in zip(paths, cases):
        with pytest.raises(error) as e:
            casa.load_checkpoint(str(path))
        assert says in str(e.value) and str(path) in str(e.value), (config, str(e.value))
