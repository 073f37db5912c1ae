"""
Tests for stream.py: the benchmark (records, cache formula, memory budget, CLI) and live captioning
(a folder of frames, a dataset clip, real-time pacing); and for experiments/live_compare.py, which
streams through stream.py's turn helper and clip reading. All with tiny random models on CPU.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import casa
import stream
from data.loader import load_image
from experiments import live_compare

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"variant", "turn", "ttft_ms", "turn_s", "decode_tok_s", "cached_entries", "kv_bytes", "peak_bytes"}
TINY = dict(n_layer=2, n_head=2, n_embd=32, image_tokens=16, gen_tokens=3, n_vis_layer=1, n_vis_head=2, n_vis_embd=32,
            warmup=1, device="cpu")
CPU = ["--device=cpu", "--threads=1"]  # live captioning's settings here: tiny models, one thread
FRAME_LINE = re.compile(r"^\s*\d+\.\d+s \| +\d+\.\d+s \| [+-]\d+\.\d+s \|")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP threads competing with other processes for
    the cores can make each op wait milliseconds: run single-threaded, restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**extra):
    """The benchmark's settings as benchmark(**TINY, **extra) runs with them (s.gen_tokens)."""
    return SimpleNamespace(**{**stream.DEFAULTS, **TINY, **extra})


def quiet(*args):
    pass


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "b.json"
    recs = stream.benchmark(log=quiet, turns=6, json=str(out), **TINY)
    assert json.loads(out.read_text()) == recs
    return recs


def test_bench_records_fields_and_formula(records):
    args = tiny()
    T = 2 + args.gen_tokens  # <|image|>, <|answer|> and every generated token are cached
    assert len(records) == 6 * (len(casa.VARIANTS) + 1)  # and the text-only reference row
    text_only = [r for r in records if r["variant"] == stream.TEXT_ONLY]
    ca = stream.bench_config(args, "ca")  # its model, fed no image: the text cache alone
    assert [r["kv_bytes"] for r in text_only] == [casa.kv_cache_bytes(ca, k, T, image_tokens=0) for k in range(1, 7)]
    for v in casa.VARIANTS:
        recs = [r for r in records if r["variant"] == v]
        assert [r["turn"] for r in recs] == list(range(6))
        config = stream.bench_config(args, v)
        for r in recs:
            assert set(r) == FIELDS
            assert r["kv_bytes"] == casa.kv_cache_bytes(config, r["turn"] + 1, T)
            assert r["ttft_ms"] > 0 and r["decode_tok_s"] > 0 and r["peak_bytes"] >= r["kv_bytes"]


def test_bench_cached_entries_growth(records):
    args = tiny()
    N, T = args.image_tokens, 2 + args.gen_tokens
    for v in casa.VARIANTS:
        entries = [r["cached_entries"] for r in records if r["variant"] == v]
        growth = {b - a for a, b in zip(entries, entries[1:])}
        config = stream.bench_config(args, v)
        keeps_frames = config.insert_images or getattr(config, "ca_all_images", False)  # insertion, ca_all (D5)
        assert growth == ({N + T} if keeps_frames else {T}), v  # the others cache only the new text
        first = casa.kv_cache_entries(config, 1, T)
        assert entries[0] == sum(first.values())


def test_bench_turn_matches_generate():
    """The benchmark's timed turn is model.generate(greedy, no stop token) split in two."""
    args = tiny()
    for v in ("ca_tv", "insertion"):
        torch.manual_seed(0)
        model = casa.VLM(stream.bench_config(args, v)).eval()
        prompt = torch.tensor([casa.encode_turn(casa.get_tokenizer(), casa.IMAGE)[0]])
        c1, c2 = model.new_cache(1), model.new_cache(1)
        with torch.inference_mode():
            for _ in range(2):
                frame = torch.rand(1, 3, model.config.image_size, model.config.image_size)
                ids, ttft, seconds = stream.one_turn(model, prompt, frame, c1, 3)
                out = model.generate(prompt, frame, max_new_tokens=3, temperature=0, cache=c2)
                assert ids == out[0, prompt.size(1):].tolist() and 0 < ttft < seconds
                assert c1.entries() == c2.entries() and c1.nbytes() == c2.nbytes()


def test_bench_memory_budget_stops_insertion():
    # insertion caches N + T entries per turn, CA only T: a budget that fits CA's 10 turns stops insertion
    args = dict(TINY, turns=10, n_layer=4)
    ca = stream.bench_config(tiny(**args), "ca")
    T = 2 + tiny().gen_tokens
    with torch.inference_mode():
        ca_params = sum(p.numel() * p.element_size() for p in casa.VLM(ca).parameters())
    budget = ca_params + 2 * casa.kv_cache_bytes(ca, 10, T) + 1024  # the projection counts KV twice
    lines = []
    recs = stream.benchmark(log=lines.append, variants="ca,insertion", max_memory=str(budget), **args)
    n_ins = sum(r["variant"] == "insertion" for r in recs)
    assert sum(r["variant"] == "ca" for r in recs) == 10
    assert 0 < n_ins < 10
    assert all(r["peak_bytes"] <= budget for r in recs)
    assert any(f"stopped at turn {n_ins} (budget" in line for line in lines)


def test_parse_bytes():
    assert stream.parse_bytes("2GB") == 2 * 10**9
    assert stream.parse_bytes("512MiB") == 512 * 2**20
    assert stream.parse_bytes("1e6") == 10**6


def test_cli_bench(tmp_path):
    """The command line, run from another folder; its picture is drawn from --json by
    experiments/efficiency.py (tested in test_experiments.py)."""
    out = tmp_path / "b.json"
    res = subprocess.run([sys.executable, str(ROOT / "stream.py"), "--bench", *(f"--{k}={v}" for k, v in TINY.items()),
                          "--threads=1", "--turns=3", "--variants=ca,insertion", f"--json={out}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "| insertion | kT + kN |" in res.stdout and "all 9 turns match" in res.stdout  # ca, insertion, text only
    assert len(json.loads(out.read_text())) == 9
    assert "TTFT insertion: first 10%" in res.stdout


# -----------------------------------------------------------------------------
# live captioning


def tiny_checkpoint(path, variant="ca", **extra):
    torch.manual_seed(0)
    config = casa.Config(n_layer=1, n_head=2, n_embd=32, image_size=16, patch_size=4,
                         n_vis_layer=1, n_vis_head=2, n_vis_embd=32, variant=variant)
    casa.save_checkpoint(path, casa.VLM(config), **extra)


def write_frames(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        names.append(f"f{i:02d}.png")
        Image.new("RGB", (24, 24), (40 * i, 100, 255 - 40 * i)).save(folder / names[-1])
    return names


def test_live_captioning_frames(tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    tiny_checkpoint(ckpt)
    write_frames(tmp_path / "frames", 4)
    delays = stream.main(["--ckpt", str(ckpt), "--frames", str(tmp_path / "frames"), "--no_wait",
                          "--max_new_tokens", "5", *CPU])
    lines = [line for line in capsys.readouterr().out.splitlines() if FRAME_LINE.match(line)]
    assert len(lines) == 4 and len(delays) == 4


def test_live_captioning_real_time(tmp_path):
    """Without --no_wait a frame is never processed before it arrives: delay >= 0."""
    ckpt = tmp_path / "ckpt.pt"
    tiny_checkpoint(ckpt)
    write_frames(tmp_path / "frames", 3)
    delays = stream.main(["--ckpt", str(ckpt), "--frames", str(tmp_path / "frames"), "--fps", "20",
                          "--max_new_tokens", "2", *CPU])
    assert len(delays) == 3 and min(delays) >= 0


@pytest.mark.parametrize("saved", ["args", "train_args"])
def test_live_captioning_clip(tmp_path, capsys, saved):
    data = tmp_path / "video"
    names = write_frames(data / "images", 3)
    clip = {"images": [f"images/{n}" for n in names], "task": "video_caption", "fps": 2,
            "turns": [{"prompt": casa.IMAGE, "answer": f"line {i}"} for i in range(3)]}
    (data / "val.jsonl").write_text(json.dumps(clip) + "\n")
    ckpt = tmp_path / "ckpt.pt"
    # the dataset comes from the checkpoint: ckpt["args"]["dataset"], or as train.py saves it
    extra = {"args": {"dataset": str(data)}} if saved == "args" else \
        {"train_args": {"dataset": "video"}, "dataset_dir": str(data)}
    tiny_checkpoint(ckpt, **extra)
    stream.main(["--ckpt", str(ckpt), "--clip", "0", "--no_wait", "--max_new_tokens", "3", *CPU])
    lines = [line for line in capsys.readouterr().out.splitlines() if FRAME_LINE.match(line)]
    assert len(lines) == 3 and "[ref: line 2]" in lines[2]


def test_live_captioning_single_image_lines(tmp_path, capsys):
    """A dataset in the one-image shorthand form (shapes, most own data): each line streams as a clip
    of one frame asked its own question, and the comment is what greedy generation answers to
    <|image|> + that question, computed here without stream.py."""
    data = tmp_path / "shapes"
    names = write_frames(data / "images", 2)
    lines = [{"image": f"images/{n}", "prompt": "what color?", "answer": "red", "task": "t"} for n in names]
    (data / "val.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ckpt = tmp_path / "ckpt.pt"
    tiny_checkpoint(ckpt, dataset_dir=str(data))
    stream.main(["--ckpt", str(ckpt), "--clip", "0-1", "--no_wait", "--max_new_tokens", "4", *CPU])
    said = [line.split(" | ", 3)[3] for line in capsys.readouterr().out.splitlines() if FRAME_LINE.match(line)]
    assert len(said) == 2 and all(s.endswith("[ref: red]") for s in said), said
    model, _ = casa.load_checkpoint(str(ckpt))
    tok = casa.get_tokenizer()
    ids, _ = casa.encode_turn(tok, casa.IMAGE + "what color?")
    image = load_image(data / "images" / names[1], model.config.image_size)[None]
    out = model.eval().generate(torch.tensor([ids]), image, max_new_tokens=4, temperature=0,
                                stop_token=tok.eot_token)[0, len(ids):].tolist()
    expected = tok.decode([t for t in out if t != tok.eot_token])
    assert said[1].split("   [ref:")[0].strip() == expected.strip()


def test_live_captioning_scores_several_clips(tmp_path, capsys):
    """--clip 0-1: each clip its own stream, every comment compared with its reference. The first
    pass records what the model says; clip 0's references are then set to exactly that, so the
    second pass must count clip 0's three comments right and clip 1's three wrong."""
    data = tmp_path / "video"
    names = write_frames(data / "images", 3)

    def write(refs0):
        clips = [{"images": [f"images/{n}" for n in names], "fps": 2,
                  "turns": [{"prompt": casa.IMAGE, "answer": a} for a in refs]} for refs in (refs0, ["line x"] * 3)]
        (data / "val.jsonl").write_text("".join(json.dumps(c) + "\n" for c in clips))

    ckpt = tmp_path / "ckpt.pt"
    tiny_checkpoint(ckpt, dataset_dir=str(data))
    args = ["--ckpt", str(ckpt), "--clip", "0-1", "--no_wait", "--max_new_tokens", "3", *CPU]
    write(["line a", "line b", "line c"])
    stream.main(args)
    said = [line.split(" | ", 3)[3].split("   [")[0] for line in capsys.readouterr().out.splitlines()
            if FRAME_LINE.match(line)]
    assert len(said) == 6
    write([s if s.strip() else "-" for s in said[:3]])  # an empty comment cannot be a reference
    delays = stream.main(args)
    out = capsys.readouterr().out
    assert len(delays) == 6
    n_right = sum(bool(s.strip()) for s in said[:3])
    assert n_right > 0, said
    assert f"all 2 clips: 6 frames;" in out and f"exactly right {n_right}/6" in out
    with pytest.raises(SystemExit, match="out of range"):
        stream.main(["--ckpt", str(ckpt), "--clip", "0-5", "--no_wait", *CPU])


def test_bench_bounded_cache_stays_flat():
    """--recent_tokens: every turn still matches the (bounded) formula, and the cache stops growing
    once sink + recent tokens are in (insertion's window holds frames too: flat from its second turn
    here); ca_all is left out, and insertion's full size is printed beside."""
    lines = []
    settings = dict(TINY, turns=8, variants="ca,ca_tv,insertion,ca_all", sink_tokens=4, recent_tokens=20)
    recs = stream.benchmark(log=lines.append, **settings)
    args = tiny(**settings)
    assert {r["variant"] for r in recs} == {"ca", "ca_tv", "insertion", stream.TEXT_ONLY}
    T = 2 + args.gen_tokens
    inserted = [r["cached_entries"] for r in recs if r["variant"] == "insertion"]
    assert inserted == [min(k * (16 + T), 4 + 20) for k in range(1, 9)]  # N + T = 21 a turn: full in the 2nd
    for v in ("ca", "ca_tv"):
        entries = [r["cached_entries"] for r in recs if r["variant"] == v]
        config = stream.bench_config(args, v)
        assert entries == [sum(casa.kv_cache_entries(config, k, T, sink_tokens=4, recent_tokens=20).values())
                           for k in range(1, 9)]
        assert entries[3] < entries[4] == entries[-1]  # 5 text tokens a turn: flat from the 5th turn (24 = 4 + 20)
    assert any(line.startswith("insertion on the same stream") for line in lines)
    with pytest.raises(ValueError, match="keep every frame in their CA layers"):
        stream.benchmark(log=quiet, variants="ca_all", recent_tokens=20, **TINY)


def test_bench_reserves_the_session_up_front():
    """Without --grow no store is ever reallocated during the timed turns (so no turn stalls on a
    copy); with --grow the stores double as they fill."""
    def allocations(**extra):
        seen = {}
        real = casa.KVStore.begin

        def spy(store, n, dtype):
            before = {i: t.data_ptr() for i, t in store.k.items()}
            real(store, n, dtype)
            after = {i: t.data_ptr() for i, t in store.k.items()}
            seen[id(store)] = seen.get(id(store), 0) + (before != after)

        casa.KVStore.begin = spy
        try:
            stream.benchmark(log=quiet, **dict(TINY, turns=12, warmup=0, variants="ca,insertion", text_only=False),
                             **extra)
        finally:
            casa.KVStore.begin = real
        return sum(seen.values())

    stores_with_layers = 2 + 1  # ca: SA and CA image stores; insertion: SA
    assert allocations() == stores_with_layers  # each allocated once, at the first turn
    assert allocations(grow=True) > stores_with_layers


def two_clips_two_models(tmp_path):
    """A dataset of two clips (frames 0-2 and 3-4) and tiny ca and insertion checkpoints made on it."""
    data = tmp_path / "video"
    names = write_frames(data / "images", 5)
    clips = [{"images": [f"images/{n}" for n in names[a:b]], "task": "video_caption", "fps": 2,
              "turns": [{"prompt": casa.IMAGE, "answer": f"line {i}"} for i in range(a, b)]} for a, b in ((0, 3), (3, 5))]
    (data / "val.jsonl").write_text("".join(json.dumps(c) + "\n" for c in clips))
    paths = [tmp_path / "ca.pt", tmp_path / "ins.pt"]
    tiny_checkpoint(paths[0], dataset_dir=str(data))
    tiny_checkpoint(paths[1], variant="insertion", dataset_dir=str(data))
    return data, names, clips, paths


def test_compare_side_by_side_clock_and_captions(tmp_path, capsys):
    """live_compare: two checkpoints caption the same clips played back to back. Each model's captions
    are what generate gives with a fresh cache per clip, and its delays follow the real-time clock:
    a turn starts at max(its frame's arrival, the previous turn's end) and lasts its compute time."""
    data, names, clips, paths = two_clips_two_models(tmp_path)
    fps = 40.0
    results = live_compare.main([f"--ckpts={paths[0]},{paths[1]}", "--clip=0-1", f"--fps={fps}", "--max_new_tokens=4",
                                 *CPU, f"--json={tmp_path / 'c.json'}", f"--png={tmp_path / 'c.png'}"])
    out = capsys.readouterr().out
    assert "exactly right 0/5" in out and len(json.loads((tmp_path / "c.json").read_text())["results"]) == 2
    # the strip shows the last clip (2 frames): one frame (96 px + 6) narrower than clip 0's (3 frames)
    live_compare.main([f"--ckpts={paths[0]},{paths[1]}", "--clip=0", "--max_new_tokens=1", *CPU,
                       f"--png={tmp_path / 'c0.png'}"])
    with Image.open(tmp_path / "c.png") as img, Image.open(tmp_path / "c0.png") as img0:
        assert img.size[0] == img0.size[0] - (96 + 6)
    tok = casa.get_tokenizer()
    stop = tok.encode(casa.ENDOFTEXT, allowed_special={casa.ENDOFTEXT})[0]
    for path in paths:
        frames = results[str(path)]
        assert len(frames) == 5
        done = 0.0
        for i, f in enumerate(frames):
            assert f["arrival"] == pytest.approx(i / fps)
            done = max(f["arrival"], done) + f["compute"]
            assert f["done"] == pytest.approx(done) and f["delay"] == pytest.approx(done - i / fps)
        model, _ = casa.load_checkpoint(str(path))
        want = []
        for clip in clips:
            cache = model.new_cache(1)
            for name in clip["images"]:
                img = load_image(data / name, model.config.image_size)[None]
                ids = torch.tensor([casa.encode_turn(tok, casa.IMAGE)[0]])
                gen = model.generate(ids, img, max_new_tokens=4, temperature=0, stop_token=stop, cache=cache)
                want.append(tok.decode([t for t in gen[0, ids.size(1):].tolist() if t != stop]).replace("\n", " "))
        assert [f["text"] for f in frames] == want


@pytest.mark.parametrize("bound", [[], ["--sink_tokens=2", "--recent_tokens=6"]])
def test_compare_one_stream_carries_the_cache_across_clips(tmp_path, bound):
    """live_compare --one_stream: the clips are one conversation. Each model's captions are what generate gives
    with ONE cache for the whole stream (for CA with --recent_tokens, one bounded cache: the first 2
    and the last 6 text tokens; insertion keeps every frame, so it stays unbounded)."""
    data, names, clips, paths = two_clips_two_models(tmp_path)
    results = live_compare.main([f"--ckpts={paths[0]},{paths[1]}", "--clip=0-1", "--fps=40", "--one_stream",
                                 "--max_new_tokens=4", *CPU, *bound])
    tok = casa.get_tokenizer()
    stop = tok.encode(casa.ENDOFTEXT, allowed_special={casa.ENDOFTEXT})[0]
    for path in paths:
        model, _ = casa.load_checkpoint(str(path))
        kept = dict(sink_tokens=2, recent_tokens=6) if bound and not model.config.keeps_every_frame else {}
        cache, want, held = model.new_cache(1, **kept), [], []
        for name in names:
            img = load_image(data / "images" / name, model.config.image_size)[None]
            ids = torch.tensor([casa.encode_turn(tok, casa.IMAGE)[0]])
            gen = model.generate(ids, img, max_new_tokens=4, temperature=0, stop_token=stop, cache=cache)
            want.append(tok.decode([t for t in gen[0, ids.size(1):].tolist() if t != stop]).replace("\n", " "))
            held.append(cache.nbytes())
        assert [f["text"] for f in results[str(path)]] == want
        assert [f["kv_bytes"] for f in results[str(path)]] == held  # the same cache, frame after frame
        if kept:  # the bound held: sinks + recent text tokens in every self-attention layer
            assert cache.entries()["self_attn"] == 8


def test_compare_refuses_frames_and_missing_checkpoints(tmp_path):
    # it plays the dataset's validation clips: a folder of frames is live captioning's (stream.py)
    with pytest.raises(SystemExit, match="unknown setting --frames"):
        live_compare.main(["--ckpts=a.pt,b.pt", f"--frames={tmp_path}"])
    with pytest.raises(SystemExit, match="^error: checkpoint not found"):
        live_compare.main([f"--ckpts={tmp_path / 'missing.pt'}", *CPU])
    with pytest.raises(SystemExit, match="^error: give the checkpoints to compare"):
        live_compare.main([])


def test_core_scripts_run_without_experiments(tmp_path):
    """stream.py and sample.py import only casa.py, configurator.py and data/: copied without
    experiments/, they start (--help imports everything) and the benchmark runs."""
    for name in ("casa.py", "configurator.py", "sample.py", "stream.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "data").mkdir()
    for name in ("__init__.py", "common.py", "loader.py"):
        shutil.copy(ROOT / "data" / name, tmp_path / "data" / name)

    def run(*args):
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                              env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"})

    for script in ("sample.py", "stream.py"):
        res = run(script, "--help")
        assert res.returncode == 0 and "settings (--name=value)" in res.stdout, res.stderr
    res = run("stream.py", "--bench", *(f"--{k}={v}" for k, v in TINY.items()), "--turns=2", "--variants=ca")
    assert res.returncode == 0 and "all 4 turns match" in res.stdout, res.stderr
