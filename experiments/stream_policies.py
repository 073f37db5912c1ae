"""
One stream, every cache policy: how each way of keeping (or dropping) old context pays in memory,
time per frame and delay against real time, on the same long stream. The policies:

    insertion                 every frame's N tokens and all text stay in its cache (kT + kN)
    insertion, Q = N/c        compressed insertion (the paper's Table 5b): Q tokens a frame (kT + kQ)
    insertion, window         a sliding window over its whole cache (StreamingVLM's baseline): the
                              last W tokens, frames and text alike, so old frames are dropped
    ca                        its text cache grows (kT), one frame in its CA layers (+ N)
    ca, text window           the last W text tokens (StreamingLLM without sinks)
    ca, sinks + window        the first S and the last W text tokens (StreamingLLM)

Each runs the benchmark backbone of stream.py --bench (random weights, batch 1; a turn is one frame,
"<|image|><|answer|>" and gen_tokens greedy tokens), interleaved turn by turn so a change in the
machine's load hits them all alike, each cache checked against casa.kv_cache_entries/kv_cache_bytes
every turn. Delay: frame k arrives at k/fps; its turn starts when it has arrived and the model is
free, and lasts the measured time, so a policy slower than the frame interval falls ever further behind.

With trained video models (train.py --dataset=video), the table gets their accuracy under each
policy: the validation clips streamed turn by turn through one cache each, true answers fed back
(experiments/video.py's streamed_answers), exact match of the comments and of the last turn's
question about the first frame, which a window that drops that frame (or the comment about it) loses.
--trained=True trains the three it needs (insertion, insertion at Q = N/compress, ca; seed 1, Table 4's
settings at --train_iters steps, two at a time, one thread each; finished ones are reused) and uses them:

    python -m experiments.stream_policies                      # random weights: memory, time, delay
    python -m experiments.stream_policies --trained=True       # + accuracy: trains runs/video-4000/* first
    python -m experiments.stream_policies --ckpt_insertion=runs/video/insertion-s1/ckpt.pt \\
        --ckpt_compressed=path/to/compressed/ckpt.pt --ckpt_ca=runs/video/ca-s1/ckpt.pt   # your own models

Writes the table to docs/results/stream_policies.md (stream_policies_trained.md with --trained=True;
runs/results/ for other settings) and the picture to --png.
"""

import os
import sys
import time
from types import SimpleNamespace

import torch

import casa
import configurator
import stream
from data.loader import Dataset
from experiments import plots
from experiments.runs import AT_LEAST_0, AT_LEAST_1, ROOT, TASK_SETTINGS, check_picture, check_settings, is_default, \
    markdown_table, run_all, write_result
from experiments.video import BUDGET, jobs_for, streamed_answers, turn_kind

# -----------------------------------------------------------------------------
turns = 240  # frames in the stream
fps = 10.0  # frame rate for the delay column
compress = 4  # compressed insertion keeps Q = N / compress tokens a frame
window_frames = 4  # insertion's window: the last window_frames x (N + T) tokens, frames and text
text_window = 64  # ca's text window: the last text_window text tokens
sink_tokens = 4  # ca's sinks: the first tokens every bounded cache keeps
ckpt_insertion = ""  # trained video models (optional): accuracy under each policy
ckpt_compressed = ""
ckpt_ca = ""
trained = False  # True: train the three (or reuse them when finished) and fill the accuracy columns
train_iters = 4000  # their budget: half of Table 4's 8000 (experiments/video.py), about 50 min a model
jobs = 2  # --trained: runs at a time
png = "docs/stream_policies.png"
# the benchmark backbone and turn, as stream.py --bench
image_tokens = 64
gen_tokens = 8
n_layer = 2
n_head = 16
n_embd = 1024
patch_size = 4
warmup = 3
seed = 1337
device = "auto"
threads = 1  # 1 keeps timings stable
# -----------------------------------------------------------------------------
DEFAULTS = configurator.settings(globals())
# the policies' colours in the picture, in their order: insertion's reds and browns, ca's blues and green
COLORS = [(214, 39, 40), (255, 127, 14), (140, 86, 75), (31, 119, 180), (23, 190, 207), (44, 160, 44)]


def policies(s, bench, T):
    """[(name, config, cache bound, which trained checkpoint it uses)] for a stream of turns of T text
    tokens and one frame of s.image_tokens tokens; bench: stream.py's settings for the backbone."""
    insertion, ca = stream.bench_config(bench, "insertion"), stream.bench_config(bench, "ca")
    N = insertion.n_image_tokens
    compressed = casa.Config(**{**vars(insertion), "compress_queries": max(1, N // s.compress)})
    window = s.window_frames * (N + T)
    return [
        ("insertion", insertion, {}, "insertion"),
        (f"insertion, Q = {compressed.compress_queries}", compressed, {}, "compressed"),
        (f"insertion, window {window}", insertion, dict(recent_tokens=window), "insertion"),
        ("ca", ca, {}, "ca"),
        (f"ca, text window {s.text_window}", ca, dict(recent_tokens=s.text_window), "ca"),
        (f"ca, {s.sink_tokens} sinks + window {s.text_window}", ca,
         dict(sink_tokens=s.sink_tokens, recent_tokens=s.text_window), "ca"),
    ]


def delays(seconds, fps):
    """Per-turn delays (s) behind real time: frame k arrives at k/fps, its turn starts when it has
    arrived and the previous one is done, and takes seconds[k]."""
    clock, out = 0.0, []
    for k, t in enumerate(seconds):
        clock = max(k / fps, clock) + t
        out.append(clock - k / fps)
    return out


def trained_accuracy(path, bound, kind, window_frames):
    """Exact match per turn kind ("comment", "memory: color", "memory: shape") of a trained video model's
    validation clips under `bound` (an insertion window given in frames is turned into tokens with
    the model's N and the clips' mean turn length)."""
    model, ckpt = stream.load_model(path, "cpu")
    want = {"insertion": lambda c: c.insert_images and not c.compress_queries,
            "compressed": lambda c: c.insert_images and c.compress_queries > 0,
            "ca": lambda c: not c.keeps_every_frame}[kind]
    if not want(model.config):
        raise ValueError(f"--ckpt_{kind}={path} is a {model.config.variant} model"
                         f"{' with compress_queries' if model.config.compress_queries else ''}: give a {kind} one")
    data = Dataset(ckpt.get("dataset_dir", ""), "val", model.config.image_size)
    if bound.get("recent_tokens") and model.config.insert_images:
        lengths = [end - start for s in data.samples for start, _, end in s.turns_at]
        T = round(sum(lengths) / len(lengths))
        bound = dict(bound, recent_tokens=window_frames * (model.config.tokens_per_image + T))
    answers, most = streamed_answers(model, data, **bound)
    right = {}
    for (i, t), (pred, truth) in answers.items():
        right.setdefault(turn_kind(data.samples[i], t), []).append(pred == truth)
    return {k: sum(v) / len(v) for k, v in right.items()}, most


def video_jobs(s):
    """{kind: (out_dir, train.py settings)} of the three trained video models --trained uses: Table 4's
    settings (experiments/video.py) at s.train_iters steps, seed 1; Table 4's own runs at its budget."""
    root = "runs/video" if s.train_iters == BUDGET["max_iters"] else f"runs/video-{s.train_iters}"
    (_, ca), (_, insertion) = jobs_for(["ca", "insertion"], [1], dict(BUDGET, max_iters=s.train_iters), root)
    v = TASK_SETTINGS["video"]
    Q = max(1, (v["image_size"] // v["patch_size"]) ** 2 // s.compress)
    return {"insertion": (f"{root}/insertion-s1", insertion),
            "compressed": (f"{root}/insertion-q{s.compress}-s1", dict(insertion, compress_queries=Q)),
            "ca": (f"{root}/ca-s1", ca)}


@torch.inference_mode()
def run(s):
    torch.set_num_threads(casa.pick_threads(s.threads)[0])
    dev = casa.pick_device(s.device)
    bench = SimpleNamespace(**{**stream.DEFAULTS, **{k: v for k, v in vars(s).items() if k in stream.DEFAULTS}})
    T = 2 + s.gen_tokens  # <|image|> <|answer|> and the generated tokens, all cached
    table = policies(s, bench, T)
    size = table[0][1].image_size
    gen = torch.Generator().manual_seed(s.seed)
    frames = [torch.rand(1, 3, size, size, generator=gen).to(dev) for _ in range(8)]
    print(f"stream policies: {s.turns} frames at {s.fps:g} fps (one every {1000 / s.fps:.0f} ms), "
          f"N={table[0][1].n_image_tokens} image tokens + T={T} text tokens a turn; backbone n_layer={s.n_layer} n_embd={s.n_embd} n_head="
          f"{s.n_head}, random weights, batch 1, {dev}, {torch.get_num_threads()} thread(s); caches reserved for the "
          "whole stream; policies interleaved turn by turn", flush=True)
    t0 = time.perf_counter()
    sessions = [stream.Session(bench, name, config, bound, dev, frames, grow=False) for name, config, bound, _ in table]
    for k in range(s.turns):
        for x in sessions:
            x.turn(k, log=print)
        if (k + 1) % max(1, s.turns // 10) == 0:
            print(f"  frame {k + 1}/{s.turns}: {time.perf_counter() - t0:.0f} s", flush=True)
    wall = time.perf_counter() - t0
    failures = [f for x in sessions for f in x.failures]
    if failures:
        sys.exit(f"FAIL: a cache disagrees with casa's formula on {len(failures)} turns: {failures[0]}")

    accuracy = {}
    for kind in ("insertion", "compressed", "ca"):
        path = getattr(s, f"ckpt_{kind}")
        for name, _, bound, uses in table:
            if path and uses == kind:
                accuracy[name], _ = trained_accuracy(path, bound, kind, s.window_frames)
                print(f"{name}: {accuracy[name]}", flush=True)

    rows, records, data = [], [], {}
    n = max(1, s.turns // 10)
    for (name, config, bound, _), x in zip(table, sessions):
        seconds = [r["ttft_ms"] / 1000 for r in x.records]  # frame to first token
        turn_s = [r["turn_s"] for r in x.records]  # the whole turn: first token and the gen_tokens after it
        late = delays(turn_s, s.fps)
        for r, d in zip(x.records, late):
            records.append(dict(r, delay_s=d))
        mean = lambda v, part: sum(v[part]) / len(v[part])  # noqa: E731
        first, last = slice(0, n), slice(-n, None)
        acc = accuracy.get(name, {})
        data[name] = dict(kv_mib=x.records[-1]["kv_bytes"] / stream.MiB, peak_mib=x.records[-1]["peak_bytes"] / stream.MiB,
                          turn_ms_first=1000 * mean(turn_s, first), turn_ms_last=1000 * mean(turn_s, last),
                          ttft_ms_first=1000 * mean(seconds, first), ttft_ms_last=1000 * mean(seconds, last),
                          delay_s_last=late[-1], delay_s_max=max(late), keeps=casa.kv_cache_entries(config, s.turns, T, **bound),
                          accuracy=acc)
        d = data[name]
        rows.append([name, sum(d["keeps"].values()), f"{d['kv_mib']:.1f}", f"{d['peak_mib']:.0f}",
                     f"{d['turn_ms_first']:.1f} → {d['turn_ms_last']:.1f}", f"{d['ttft_ms_first']:.1f} → {d['ttft_ms_last']:.1f}",
                     f"{1000 / d['turn_ms_last']:.1f}", f"{d['delay_s_last']:+.2f}",
                     *(f"{acc[k]:.3f}" if k in acc else "" for k in ("comment", "memory: color", "memory: shape"))])
    header = ["policy", f"entries a layer after {s.turns} frames", "KV MiB", "peak MiB",
              "ms a frame (first 10% → last 10%)", "TTFT ms (first → last 10%)", "frames/s it keeps up with (last 10%)",
              f"delay at {s.fps:g} fps, last frame",
              "comments", "memory: colour", "memory: shape"]
    text = (f"One stream, every cache policy: {s.turns} frames at {s.fps:g} fps, N = {table[0][1].n_image_tokens} image "
            f"tokens and T = {T} text tokens a turn, backbone {s.n_layer} x {s.n_embd} (random weights), "
            f"{dev}, {torch.get_num_threads()} thread(s); {wall:.0f} s for all of it. Memory: KV bytes in use after the "
            f"last frame, peak = parameters + KV tensors as allocated. Delay: how far behind real time the last frame's "
            f"answer is ready. Accuracy (trained video models, when given): exact match on data/video's validation clips "
            f"streamed through the policy's cache; those models have their own N (Q = N/{s.compress} for the compressed "
            f"one; the insertion window holds their last {s.window_frames} frames and turns, the text windows as named)."
            + "\n\n" + markdown_table(header, rows))
    if s.trained:  # the published table with accuracy is the one --trained=True makes, whatever the paths
        write_result("stream_policies_trained", text, data,
                     published=is_default({**vars(s), **{f"ckpt_{k}": "" for k in ("insertion", "compressed", "ca")}},
                                          dict(DEFAULTS, trained=True)))
    else:
        write_result("stream_policies", text, data, published=is_default(vars(s), DEFAULTS))
    if s.png:
        plots.line_panels(records, os.path.join(ROOT, s.png),
                          [("kv_bytes", "KV cache (MiB)", 1 / stream.MiB), ("turn_s", "time a frame (ms)", 1000),
                           ("delay_s", f"delay behind real time at {s.fps:g} fps (s)", 1)],
                          title=f"One stream of {s.turns} frames, six cache policies (random weights, {dev})",
                          colors={name: color for (name, *_), color in zip(table, COLORS)})
        print(f"wrote {s.png}")
    return data


def main(argv=None):
    configurator.apply(globals(), argv)
    s = SimpleNamespace(**configurator.settings(globals()))
    check_settings(vars(s), turns=AT_LEAST_1, compress=AT_LEAST_1, window_frames=AT_LEAST_1, text_window=AT_LEAST_1,
                   sink_tokens=AT_LEAST_0, image_tokens=AT_LEAST_1, gen_tokens=AT_LEAST_1, n_layer=AT_LEAST_1,
                   n_head=AT_LEAST_1, n_embd=AT_LEAST_1, patch_size=AT_LEAST_1, warmup=AT_LEAST_0, seed=AT_LEAST_0,
                   threads=AT_LEAST_0, jobs=AT_LEAST_1, train_iters=AT_LEAST_1, fps=(lambda f: 1 / stream.MAX_FPS <= f <= stream.MAX_FPS,
                                            f"a rate from {1 / stream.MAX_FPS:g} to {stream.MAX_FPS:g}"))
    if s.png:
        check_picture("png", s.png, ROOT)
    if s.trained:
        given = [f"--ckpt_{k}" for k in ("insertion", "compressed", "ca") if getattr(s, f"ckpt_{k}")]
        if given:
            sys.exit(f"error: --trained=True trains its own models; leave out {', '.join(given)} (or --trained)")
        jobs = video_jobs(s)
        run_all(list(jobs.values()), parallel=s.jobs, threads=max(1, s.threads))
        for kind, (out_dir, _) in jobs.items():
            setattr(s, f"ckpt_{kind}", os.path.join(ROOT, out_dir, "ckpt.pt"))
    for kind in ("insertion", "compressed", "ca"):  # before the stream, not after it
        path = getattr(s, f"ckpt_{kind}")
        if path and not os.path.isfile(path):
            sys.exit(f"error: --ckpt_{kind}={path}: no such checkpoint (train one with python train.py "
                     "--dataset=video ...)")
    try:
        return run(s)
    except (OSError, ValueError) as e:  # a bad checkpoint, backbone sizes that do not fit
        sys.exit("error: " + " ".join(str(e).split()))


if __name__ == "__main__":
    main()
