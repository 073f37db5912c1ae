"""Bad input to every entry point but train.py and the prepare scripts (tested beside them): each case
is an entry point, its arguments and a piece of the one line it must answer with. One helper runs a
case and asserts what every case must show: a non-zero exit, exactly one line on stderr, starting
"error:", and no traceback.

Most cases run in this process (stream.py's and the experiments' main(argv), sample.py as a script
with its argv), which costs milliseconds; a few, marked PROCESS, run as real processes (about 2 s
each, importing torch) to check the exit status and stderr a user sees."""

import dataclasses
import importlib
import json
import runpy
import sys
import traceback

import pytest
import torch
from conftest import ROOT, run, write_tiny_dataset
from PIL import Image

import casa

PROCESS = True  # run this case as its own process

CASES = [
    # sample.py: settings out of range, prompts the model must write itself, devices
    ("sample.py", ["--num_samples=0"], "--num_samples must be at least 1, got 0", False),
    ("sample.py", ["--temperature=-1"], "--temperature must be 0 (greedy) or more", False),
    ("sample.py", ["--top_k=-1"], "--top_k must be 0 (off) or more", False),
    ("sample.py", ["--max_new_tokens=0"], "--max_new_tokens must be at least 1", False),
    ("sample.py", ["--seed=-3"], "--seed must be 0 or more", False),
    ("sample.py", ["--threads=-1"], "--threads must be 0 (the idle cores) or more", False),
    ("sample.py", ["--image={png}", "--prompt=<|answer|>red"], "--prompt contains <|answer|>", PROCESS),
    ("sample.py", ["--prompt=done<|endoftext|>"], "--prompt contains <|endoftext|>", False),
    ("sample.py", ["--device=banana"], "unknown device 'banana'", False),
    ("sample.py", ["--device=cuda:99"], "device 'cuda:99'", False),
    # sample.py: checkpoints, images, datasets, the grid
    ("sample.py", ["--ckpt={tmp}/missing.pt"], "checkpoint not found", False),
    ("sample.py", ["--ckpt={text}"], "not a casa checkpoint", False),
    ("sample.py", ["--ckpt={unfit}"], "size mismatch", False),
    ("sample.py", ["--ckpt={ckpt}", "--image={truncated}"], "truncated.png", PROCESS),
    ("sample.py", ["--ckpt={ckpt}", "--image=,"], "--image=',' names no file", False),
    ("sample.py", ["--ckpt={ckpt}", "--image={png},{png}", "--prompt=which?"], "2 image(s)", False),
    ("sample.py", ["--ckpt={ckpt}", "--grid={tmp}/grid"], "is not a picture file name", False),
    ("sample.py", ["--ckpt={ckpt}", "--dataset={empty}", "--grid={tmp}/g.png"], "val.jsonl", False),
    ("sample.py", ["--ckpt={ckpt}", "--split=test"], "test.jsonl not found", False),
    ("sample.py", ["--ckpt={ckpt}", "--dataset={tmp}/nowhere"], "no train.jsonl", False),
    # stream.py: settings of live captioning and of the benchmark
    ("stream.py", ["--ckpt={ckpt}", "--fps=-2"], "--fps must be 0 (the clip's) or a rate from 0.001 to 1000", PROCESS),
    ("stream.py", ["--ckpt={ckpt}", "--fps=1e-300"], "--fps must be", False),
    ("stream.py", ["--ckpt={ckpt}", "--temperature=-0.5"], "--temperature must be 0 (greedy) or more", False),
    ("stream.py", ["--ckpt={ckpt}", "--max_new_tokens=0"], "--max_new_tokens must be at least 1", False),
    ("stream.py", ["--ckpt={ckpt}", "--threads=-2"], "--threads must be", False),
    ("stream.py", ["--ckpt={ckpt}", "--prompt=what now?"], "exactly one <|image|> marker", False),
    ("stream.py", ["--ckpt={ckpt}", "--prompt=<|image|><|answer|>"], "--prompt contains <|answer|>", False),
    ("stream.py", ["--ckpt={ckpt}", "--device=banana"], "unknown device 'banana'", False),
    ("stream.py", ["--bench", "--turns=0"], "--turns must be at least 1", False),
    ("stream.py", ["--bench", "--gen_tokens=0"], "--gen_tokens must be at least 1", False),
    ("stream.py", ["--bench", "--image_tokens=10"], "--image_tokens must be a square", False),
    ("stream.py", ["--bench", "--warmup=-1"], "--warmup must be 0 or more", False),
    ("stream.py", ["--bench", "--sink_tokens=-4"], "--sink_tokens must be 0 or more", False),
    ("stream.py", ["--bench", "--recent_tokens=-1"], "--recent_tokens must be 0 (unbounded) or more", False),
    ("stream.py", ["--bench", "--n_head=0"], "--n_head must be at least 1", False),
    ("stream.py", ["--bench", "--n_head=3"], "must split into n_head", False),
    ("stream.py", ["--bench", "--max_memory=lots"], "--max_memory takes a size like 2GB", False),
    ("stream.py", ["--bench", "--max_memory=-1GB"], "--max_memory takes a size like 2GB", False),
    ("stream.py", ["--bench", "--variants=ca,banana"], "unknown variant 'banana'", False),
    ("stream.py", ["--bench", "--variants=,"], "--variants names none", False),
    ("stream.py", ["--bench", "--json={tmp}"], "is a folder", False),
    ("stream.py", [], "give --ckpt=PATH (live captioning) or --bench", False),
    # stream.py: checkpoints, clips, frames, datasets
    ("stream.py", ["--ckpt={unfit}"], "size mismatch", False),
    ("stream.py", ["--ckpt={text}"], "not a casa checkpoint", False),
    ("stream.py", ["--ckpt={ckpt}", "--clip=99"], "--clip 99 out of range: the dataset's val.jsonl has 6 clips", False),
    ("stream.py", ["--ckpt={ckpt}", "--clip=two"], "--clip takes an index (3), a range (0-9) or 'all'", False),
    ("stream.py", ["--ckpt={ckpt}", "--frames={frames}"], "f1.png", PROCESS),
    ("stream.py", ["--ckpt={ckpt}", "--frames={no_frames}"], "no images", False),
    ("stream.py", ["--ckpt={ckpt}", "--frames={tmp}/nowhere"], "no such folder", False),
    ("stream.py", ["--ckpt={orphan}"], "no val.jsonl for the checkpoint's dataset", False),
    ("stream.py", ["--ckpt={ckpt}", "--data={tmp}/nowhere"], "no val.jsonl there", False),
    ("stream.py", ["--ckpt={ckpt}", "--data={bad_fps}"], "'fps' must be a number from 0.001 to 1000, got -2", False),
    # the experiment scripts
    ("experiments.accuracy", ["--seeds=-1"], "--seeds='-1': each seed once, 0 or more", PROCESS),
    ("experiments.accuracy", ["--seeds=1,1"], "each seed once", False),
    ("experiments.accuracy", ["--max_iters=0"], "--max_iters must be at least 1", False),
    ("experiments.accuracy", ["--models=ca,banana"], "--models: unknown 'banana'", False),
    ("experiments.accuracy", ["--patch_size=3"], "--patch_size must be 0 (each task's own) or a power of 2", False),
    ("experiments.accuracy", ["--jobs=0"], "--jobs must be at least 1", False),
    ("experiments.adaptation", ["--threads=0"], "--threads must be at least 1", False),
    ("experiments.own_data", ["--seeds=one"], "not a comma-separated list of whole numbers", False),
    ("experiments.own_data", ["--datasets=scenes,,x"], "each once", False),
    ("experiments.learning", ["--every=0"], "--every must be at least 1", False),
    ("experiments.learning", ["--tasks=shapes,banana"], "--tasks: unknown 'banana'", False),
    ("experiments.video", ["--max_iters=0"], "--max_iters must be at least 1", False),
    ("experiments.video", ["--bounded={tmp}/missing.pt"], "checkpoint not found", False),
    ("experiments.video", ["--bounded={ckpt}", "--recent_tokens=8,-1"], "--recent_tokens='8,-1'", False),
    ("experiments.attention", ["--samples=0"], "--samples must be at least 1", False),
    ("experiments.attention", ["--out=attention"], "--out=attention is not a picture file name", False),
    ("experiments.draw_masks", ["--out={tmp}/masks"], "is not a picture file name", False),
    ("experiments.efficiency", ["--train_steps=0"], "--train_steps must be at least 1", False),
    ("experiments.efficiency", ["--patch_size=5"], "--patch_size must be a power of 2", False),
    ("experiments.efficiency", ["--variants=banana"], "--variants: unknown 'banana'", False),
    ("experiments.efficiency", ["--device=banana"], "unknown device 'banana'", False),
    ("experiments.efficiency", ["--stream_json={records}", "--png={tmp}/s.png"], "holds no benchmark records", False),
    ("experiments.kv_projection", ["--image_tokens=256,-5"], "--image_tokens takes a comma list of numbers", False),
    ("experiments.kv_projection", ["--text_tokens=0"], "--text_tokens must be at least 1", False),
    ("experiments.token_scale", ["--ckpt={unfit}"], "size mismatch", False),
    ("experiments.token_scale", ["--ckpt={orphan}"], "val.jsonl not found", False),
    ("experiments.vision_probe", ["--dataset={data}", "--steps=0"], "--steps must be at least 1", False),
    ("experiments.vision_probe", ["--dataset={data}", "--learning_rate=-1.0"], "--learning_rate must be more than 0",
     False),
    ("experiments.vision_probe", ["--dataset={data}", "--patch_size=3"], "must be a power of 2", False),
    ("experiments.vision_probe", ["--dataset={data}", "--ckpt={tmp}/missing.pt"], "checkpoint not found", False),
    ("experiments.live_compare", ["--ckpts={ckpt}", "--fps=-2"], "--fps must be", False),
    ("experiments.live_compare", ["--ckpts={unfit}"], "size mismatch", False),
    ("experiments.live_compare", ["--ckpts={orphan}"], "no val.jsonl for the checkpoint's dataset", False),
    ("experiments.gpu_check", ["--require_gpu=False", "--out_dir={text}"], "cannot make it", False),
    ("experiments.significance", ["--a=0.9,0.8", "--b=0.7,0.6", "--n=0"], "--n > 0", False),
]
assert sum(case[3] for case in CASES) <= 5  # each process costs seconds


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The paths the cases name: a tiny dataset and checkpoint, and broken ones of each kind."""
    d = tmp_path_factory.mktemp("bad_input")
    data = write_tiny_dataset(d / "data")  # 6 validation lines: one-image ones and two-image clips
    config = casa.Config(n_layer=1, n_head=2, n_embd=32, image_size=16, patch_size=8, n_vis_layer=1, n_vis_head=2,
                         n_vis_embd=32, block_size=64)
    torch.manual_seed(0)
    model = casa.VLM(config)
    casa.save_checkpoint(d / "ckpt.pt", model, train_args={"dataset": str(data)}, dataset_dir=str(data))
    # weights that do not fit: the config says twice as wide as the weights are
    casa.save_checkpoint(d / "unfit.pt", model, config=dataclasses.asdict(dataclasses.replace(config, n_embd=64)))
    casa.save_checkpoint(d / "orphan.pt", model, train_args={"dataset": str(d / "gone")}, dataset_dir=str(d / "gone"))
    (d / "text.pt").write_text("not a checkpoint\n")
    # a truncated PNG: the first half of one of noise (which does not compress away)
    Image.effect_noise((64, 64), 80).convert("RGB").save(d / "noise.png")
    png = (d / "noise.png").read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    (d / "frames").mkdir()
    (d / "frames" / "f0.png").write_bytes(png)
    (d / "frames" / "f1.png").write_bytes(png[: len(png) // 2])
    (d / "no_frames").mkdir()
    (d / "no_frames" / "notes.txt").write_text("no images here\n")
    empty = write_tiny_dataset(d / "empty")  # its validation split empty
    (empty / "val.jsonl").write_text("")
    bad_fps = write_tiny_dataset(d / "bad_fps")  # a clip with a negative frame rate
    lines = (bad_fps / "val.jsonl").read_text().splitlines()
    (bad_fps / "val.jsonl").write_text("\n".join([json.dumps({**json.loads(lines[0]), "fps": -2}), *lines[1:]]) + "\n")
    (d / "records.json").write_text('{"not": "records"}')
    paths = dict(tmp=d, data=data, ckpt=d / "ckpt.pt", unfit=d / "unfit.pt", orphan=d / "orphan.pt",
                 text=d / "text.pt", png=d / "noise.png", truncated=d / "truncated.png", frames=d / "frames",
                 no_frames=d / "no_frames", empty=empty, bad_fps=bad_fps, records=d / "records.json")
    return {k: str(v) for k, v in paths.items()}


def outcome(entry, args, process=False):
    """Run an entry point ("sample.py", "stream.py" or a module such as "experiments.accuracy") with
    args -> (exit status, stderr). In this process a SystemExit's message is what its process would
    print on stderr, and any other exception is printed as the traceback it would be."""
    if process:
        r = run(entry, *args, check=False, module=not entry.endswith(".py"), timeout=120)
        return r.returncode, r.stderr
    try:
        if entry == "sample.py":  # a flat script: run as __main__ with its command line
            argv = sys.argv
            sys.argv = [entry, *args]
            try:
                runpy.run_path(str(ROOT / entry), run_name="__main__")
            finally:
                sys.argv = argv
        else:
            importlib.import_module(entry.removesuffix(".py")).main(args)
    except SystemExit as e:
        if isinstance(e.code, str):  # sys.exit(message): the message on stderr, exit status 1
            return 1, e.code + "\n"
        return e.code or 0, ""
    except Exception:
        return 1, traceback.format_exc()
    return 0, ""


def assert_one_error_line(status, stderr, expected):
    assert status != 0, f"exit status 0: {stderr}"
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0], f"expected {expected!r} in: {lines[0]}"


@pytest.mark.parametrize("entry, args, expected, process", CASES,
                         ids=[f"{e} {' '.join(a)}" for e, a, _, _ in CASES])
def test_bad_input_gets_one_error_line(files, entry, args, expected, process):
    defaults = ["--threads=1"] if entry in ("sample.py", "stream.py") else []  # tiny models: one thread
    if entry == "sample.py" and not any(a.startswith("--ckpt=") for a in args):
        defaults.append(f"--ckpt={files['ckpt']}")
    status, stderr = outcome(entry, defaults + [a.format(**files) for a in args], process)
    assert_one_error_line(status, stderr, expected.format(**files))


def test_an_image_over_pillows_size_limit(files, monkeypatch):
    """Pillow's guard against decompression bombs (DecompressionBombError is not an OSError): one line."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the 64x64 picture is 4 times over it
    status, stderr = outcome("sample.py", ["--threads=1", f"--ckpt={files['ckpt']}", f"--image={files['png']}"])
    assert_one_error_line(status, stderr, "noise.png")


def test_any_checkpoint_streams_its_dataset_or_a_folder_of_frames(files, capsys, tmp_path):
    """A model trained on one-image lines (and two-image ones) streams every line of its dataset, one
    frame a turn, or a folder of frames: nothing needs a video dataset."""
    import stream

    args = [f"--ckpt={files['ckpt']}", "--no_wait", "--max_new_tokens=2", "--device=cpu", "--threads=1"]
    delays = stream.main([*args, "--clip=all"])
    assert len(delays) == 4 + 2 * 2 and "all 6 clips: 8 frames" in capsys.readouterr().out  # 4 lines of one image
    for i in range(3):
        Image.new("RGB", (20, 20), (80 * i, 90, 200)).save(tmp_path / f"{i}.png")
    assert len(stream.main([*args, f"--frames={tmp_path}"])) == 3
