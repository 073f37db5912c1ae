"""
stream.py: stream video into a vision-language model, one frame per turn, through ONE persistent
KV cache; and measure why cross-attention stays flat where token insertion grows.

Three modes:

  live captioning   python stream.py --ckpt out/ckpt.pt [--clip 0 | --clip 0-9 | --frames DIR] [--fps 2]
      Frames of a clip (the checkpoint's dataset, val.jsonl) or a folder of images (sorted by name)
      arrive in simulated real time: frame i at i/fps seconds. Each frame is one turn,
      "<|image|><|answer|>" + the model's commentary, appended to the same cache. One line per frame:
      its time in the video, when the line was ready (wall clock since the start) and the delay.

  side by side      python stream.py --compare ca.pt,insertion.pt --clip 0-9 --fps 20
      The clips played back to back, captioned by each model on a simulated real-time clock (a turn
      starts when its frame has arrived and the model is free): whose delay grows, whose does not.

  benchmark         python stream.py --bench [--turns 300] [--image_tokens 64] [--gen_tokens 8]
      Every variant on the same backbone with random weights, batch 1, K turns of one N-token frame
      plus m greedy tokens. Per turn: time to first token, decode speed, cached entries, KV bytes,
      peak memory; the measured cache is checked against casa.kv_cache_bytes/kv_cache_entries.
      Caches are reserved for the whole session (no turn stalls on a copy; --grow to see the stalls),
      and a text-only row (ca's model, no image) shows how much growth the text cache alone causes.
      --recent_tokens W [--sink_tokens S] bounds the text cache (StreamingLLM) for endless streams.
      Prints a table (TTFT median / p99 / max, growth), writes --json and draws --png.

  analytic          python stream.py --analytic
      KV-cache bytes per turn for the paper's backbones (bf16), and the turn at which each variant's
      cache passes 80 GB.
"""

import json
import math
import os
import sys
import time
from types import SimpleNamespace

import torch

import casa
import configurator
from experiments import plots

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MiB = 2**20
TEXT_ONLY = "text only"  # the benchmark's reference row: no image at all

# -----------------------------------------------------------------------------
# settings; each can be set as --name=value or --name value, a boolean as a bare --name
SETTINGS = dict(
    device="auto",  # auto: cuda, then mps, then cpu; or a torch device name
    seed=1337,
    threads=0,  # CPU threads for torch (0: torch's choice); 1 keeps timings stable on shared cores
    # live captioning
    ckpt="",  # a checkpoint (casa.save_checkpoint format) to caption with
    clip="0",  # clip(s) of the dataset's val.jsonl: 3, 0-9 or all; each its own stream, summed up at the end
    frames="",  # a folder of images (sorted by name) instead of a clip
    data="",  # dataset folder; empty: the checkpoint's, else data/video
    fps=0.0,  # frames per second; 0: the clip's, else 2
    prompt=casa.IMAGE,  # each turn's prompt, with one <|image|> marker
    clip_prompts=False,  # use the clip's own prompts (e.g. its final question)
    max_new_tokens=64,  # bytes: a caption of n characters takes n tokens (the longest built-in one: 48)
    temperature=0.0,  # 0: greedy
    top_k=0,  # 0: off
    no_wait=False,  # don't wait for a frame's real arrival time
    compare="",  # several checkpoints (a.pt,b.pt): the clips played back to back, captioned side by side
    compare_json="",  # with compare: write every frame's times and captions here
    compare_png="",  # with compare: draw the last clip's frames with each model's captions and delays here
    one_stream=False,  # with compare: the clips go through ONE cache, one long conversation (each model's cache
    # reserved for the whole stream), instead of a fresh cache per clip; add --recent_tokens to bound CA's
    # benchmark
    bench=False,  # run the streaming benchmark
    turns=300,
    image_tokens=64,  # N, a square: (image_size / patch_size)^2
    gen_tokens=8,  # m tokens generated (and cached) per turn
    variants=",".join(casa.VARIANTS),
    warmup=3,  # untimed turns on a throwaway cache first
    text_only=True,  # add the reference row: ca's model fed the same turns with no image (its text cache alone)
    grow=False,  # let the caches double when full instead of reserving the session's size (shows the stalls;
    # always so with max_memory)
    sink_tokens=0,  # with recent_tokens: the first tokens every bounded cache keeps (StreamingLLM's sinks)
    recent_tokens=0,  # > 0: bound the text cache to sink_tokens + recent_tokens (variants with one image only)
    # a wide, shallow backbone: at batch 1 every step reads the weights and the whole KV cache, and
    # CA's text cache after k turns, kT entries of 2*n_embd floats per layer, is kT/(8*n_embd) of the
    # weights (~16*n_embd^2 per layer). n_embd=1024 keeps that at ~0.36 after 300 turns (CA's time to
    # first token grew 13-26% in our CPU runs); with n_embd=384 it reaches ~1 and CA's TTFT grew up to ~35%.
    n_layer=2,
    n_head=16,
    n_embd=1024,
    patch_size=4,
    n_vis_layer=2,
    n_vis_head=4,
    n_vis_embd=128,
    max_memory="",  # e.g. 2GB, 512MiB: stop a variant before a turn whose projected memory, max(last
    # turn's peak, weights + 2 x the formula's KV after it: the store may double), passes it; empty: no limit
    json="",  # write the per-turn records here
    png="",  # draw memory and TTFT against the turn here
    # analytic
    analytic=False,  # KV bytes of the paper's backbones, per variant
    text_tokens=16,  # T text tokens per turn
    analytic_image_tokens="256,1024",  # N image tokens per frame, a comma list
)


def parse_args(argv=None):
    """SETTINGS with the command line (default: sys.argv[1:]) on top, as attributes: args.turns."""
    argv = sys.argv[1:] if argv is None else argv
    return SimpleNamespace(**{**SETTINGS, **configurator.parse(argv, SETTINGS, __doc__)})


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    elif str(device).startswith("mps"):
        torch.mps.synchronize()


# -----------------------------------------------------------------------------
# Live captioning


def saved_settings(ckpt):
    """The training settings a checkpoint carries: train.py saves them as 'train_args'."""
    for key in ("train_args", "args"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    return {}


def find_dataset(args, ckpt):
    """--data if given, else the checkpoint's dataset (its 'dataset_dir', or the 'dataset' setting it
    was trained with), else data/video. A name like "video" is looked up under data/."""
    saved = [ckpt.get("dataset_dir"), saved_settings(ckpt).get("dataset"), "data/video"]
    candidates = [args.data] if args.data else saved
    for candidate in candidates:
        if not isinstance(candidate, str) or not candidate:
            continue
        for path in (candidate, os.path.join(HERE, candidate), os.path.join(HERE, "data", candidate)):
            if os.path.isfile(os.path.join(path, "val.jsonl")):
                return path
    raise FileNotFoundError(f"no val.jsonl found for dataset {' / '.join(str(c) for c in candidates if c)}; make the "
                            "video clips with: python data/video/prepare.py (or pass --frames DIR)")


def clip_indices(spec, n):
    """--clip: "3" -> [3]; "0-9" -> [0..9]; "all" -> every clip of the split (n of them)."""
    if spec == "all":
        return list(range(n))
    try:
        lo, _, hi = spec.partition("-")
        out = list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"--clip takes an index (3), a range (0-9) or 'all', got {spec!r}") from None
    if not out or not 0 <= out[0] <= out[-1] < n:
        raise IndexError(f"--clip {spec} out of range: the dataset's val.jsonl has {n} clips")
    return out


def read_clips(args, ckpt):
    """-> (dataset folder, the clips of its val.jsonl)."""
    folder = find_dataset(args, ckpt)
    with open(os.path.join(folder, "val.jsonl"), encoding="utf-8") as f:
        return folder, [json.loads(line) for line in f if line.strip()]


def load_frames(args, image_size, folder=None, clip=None, index=None):
    """-> (frames (K, 3, S, S), prompts [K], references [K] or None, fps, description), of --frames
    or of `clip`, the clip `index` of folder/val.jsonl."""
    if args.frames:
        if not os.path.isdir(args.frames):
            raise FileNotFoundError(f"--frames {args.frames}: no such folder")
        names = sorted(f for f in os.listdir(args.frames) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {args.frames}")
        frames = [casa.load_image(os.path.join(args.frames, f), image_size) for f in names]
        return torch.stack(frames), [args.prompt] * len(frames), None, args.fps or 2.0, args.frames
    if "images" not in clip:  # the one-image shorthand line (shapes, most own data): a clip of one frame,
        # asked its own question (the image goes first, as in training)
        prompt = clip["prompt"] if casa.IMAGE in clip["prompt"] else casa.IMAGE + clip["prompt"]
        return (casa.load_image(os.path.join(folder, clip["image"]), image_size)[None], [prompt], [clip["answer"]],
                args.fps or 2.0, f"{folder}/val.jsonl line {index + 1} ({clip.get('task', '?')}, one image)")
    frames = torch.stack([casa.load_image(os.path.join(folder, p), image_size) for p in clip["images"]])
    turns = clip.get("turns", [])
    refs = [t["answer"] for t in turns] if len(turns) == len(frames) else None
    prompts = [t["prompt"] for t in turns] if args.clip_prompts and refs else [args.prompt] * len(frames)
    desc = f"{folder}/val.jsonl clip {index} ({clip.get('task', '?')})"
    return frames, prompts, refs, args.fps or clip.get("fps", 2.0), desc


@torch.inference_mode()
def live(args):
    """Live captioning of --frames, or of one or several validation clips (--clip 3, 0-9, all), each
    clip its own stream with a fresh cache. Returns the delay of every frame (seconds)."""
    device = casa.pick_device(args.device)
    model, ckpt = casa.load_checkpoint(args.ckpt, device=device)
    model.eval()
    tok = casa.get_tokenizer()
    folder, clips = (None, []) if args.frames else read_clips(args, ckpt)
    indices = [None] if args.frames else clip_indices(str(args.clip), len(clips))
    delays, right = [], []
    for index in indices:
        clip = None if index is None else clips[index]
        frames, prompts, refs, fps, desc = load_frames(args, model.config.image_size, folder, clip, index)
        d, r = live_stream(args, model, tok, device, frames, prompts, refs, fps, desc)
        delays += d
        right += r
    if len(indices) > 1:
        print(f"all {len(indices)} clips: {len(delays)} frames; delay mean {sum(delays) / len(delays):+.3f}s, "
              f"max {max(delays):+.3f}s" + (f"; exactly right {sum(right)}/{len(right)} ({sum(right) / len(right):.3f})"
                                             if right else ""))
    return delays


def live_stream(args, model, tok, device, frames, prompts, refs, fps, desc):
    """One stream: frame i arrives at i/fps seconds; its turn, prompt + the model's commentary, goes
    into one cache. Returns (delays, [right] per frame when there are references)."""
    stop = tok.encode(casa.ENDOFTEXT, allowed_special={casa.ENDOFTEXT})[0]
    for p in prompts:
        if p.count(casa.IMAGE) != 1:
            raise ValueError(f"each turn's prompt needs exactly one {casa.IMAGE} marker (the frame), got {p!r}")
    print(f"live captioning: {len(frames)} frames of {desc} at {fps:g} fps, variant {model.config.variant}, "
          f"{device}{', no waiting for real time' if args.no_wait else ''}")
    print(" video t | ready at |  delay | commentary    (delay = ready - the frame's time; < 0: ahead of the video)")
    cache = model.new_cache(1)
    delays, right, start = [], [], time.perf_counter()
    for i, frame in enumerate(frames):
        arrival = i / fps  # frame i arrives i/fps seconds after the start
        if not args.no_wait:  # the model is ahead of the video: wait for the frame
            time.sleep(max(0.0, arrival - (time.perf_counter() - start)))
        ids, _ = casa.encode_turn(tok, prompts[i])
        idx = torch.tensor([ids], device=device)
        out = model.generate(idx, frame[None].to(device), max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k or None, stop_token=stop, cache=cache)
        sync(device)
        ready = time.perf_counter() - start
        new = [t for t in out[0, len(ids):].tolist() if t != stop]  # the answer; the cache also holds <|endoftext|>
        text = tok.decode(new).replace("\n", " ")
        delays.append(ready - arrival)
        ref = ""
        if refs is not None:
            right.append(text.strip() == refs[i].strip())
            ref = f"   [{'ok' if right[-1] else 'ref: ' + refs[i]}]"
        print(f"{arrival:7.2f}s | {ready:7.2f}s | {ready - arrival:+5.2f}s | {text}{ref}", flush=True)
    duration = len(frames) / fps
    processing = time.perf_counter() - start
    e = cache.entries()
    exact = f"; exactly right {sum(right)}/{len(right)}" if right else ""
    print(f"{len(frames)} frames ({duration:.1f}s of video) in {processing:.2f}s; delay mean "
          f"{sum(delays) / len(delays):+.3f}s, max {max(delays):+.3f}s{exact}; cache {cache.nbytes() / MiB:.2f} MiB, "
          f"entries per layer {e}")
    return delays, right


def caption_stream(model, tok, clips, fps, max_new_tokens, stop, bound, one_stream=False):
    """One model captions clips played back to back as one stream, on a simulated real-time clock:
    frame i of the stream arrives at i/fps, its turn starts when it has arrived and the model is
    free, and ends after the measured compute time. A model slower than the frame interval falls
    behind and its delay keeps growing, exactly as it would live; models run one after another, so
    they do not disturb each other's timings. By default each clip starts a fresh cache: a new clip
    is a new conversation, as in training. one_stream: one cache for the whole stream, as a live
    captioner that never restarts holds it; it is reserved up front for every frame's prompt and
    max_new_tokens (no turn stalls on a copy), and `bound` (sink_tokens, recent_tokens) keeps a CA
    model's cache constant. clips: [(frames (K, 3, S, S), prompts [K])].
    Returns a list of dicts (arrival, done, compute, delay, text, kv_bytes: the cache after the turn),
    one per frame."""
    device = model.lm_head.weight.device
    clock, out = 0.0, []
    if one_stream:
        frames = sum(len(f) for f, _ in clips)
        longest = max(len(casa.encode_turn(tok, p)[0]) for _, prompts in clips for p in prompts)
        cache = model.new_cache(1, capacity=casa.kv_cache_entries(model.config, frames, longest + max_new_tokens,
                                                                   **bound), **bound)
    for frames, prompts in clips:
        if not one_stream:
            cache = model.new_cache(1, **bound)
        for frame, prompt in zip(frames, prompts):
            arrival = len(out) / fps
            ids, _ = casa.encode_turn(tok, prompt)
            sync(device)
            t0 = time.perf_counter()
            gen = model.generate(torch.tensor([ids], device=device), frame[None].to(device),
                                 max_new_tokens=max_new_tokens, temperature=0, stop_token=stop, cache=cache)
            sync(device)
            compute = time.perf_counter() - t0
            clock = max(arrival, clock) + compute
            text = tok.decode([t for t in gen[0, len(ids):].tolist() if t != stop]).replace("\n", " ")
            out.append(dict(arrival=arrival, done=clock, compute=compute, delay=clock - arrival, text=text,
                            kv_bytes=cache.nbytes()))
    return out


@torch.inference_mode()
def compare(args):
    """Live captioning by several checkpoints side by side (--compare a.pt,b.pt): the chosen clips
    (--clip 0-9) played back to back as one stream at --fps, greedy. Prints each frame's delay and
    caption per model, and a summary. Returns {checkpoint: [one dict per frame]}."""
    if args.frames:
        raise ValueError("--compare plays the dataset's validation clips (--clip 0-9); --frames is for one "
                         "model's live captioning (--ckpt)")
    device = casa.pick_device(args.device)
    paths = [p for p in args.compare.split(",") if p]
    models = [casa.load_checkpoint(p, device=device) for p in paths]
    folder, clips = read_clips(args, models[0][1])
    indices = clip_indices(str(args.clip), len(clips))
    fps = args.fps or clips[indices[0]].get("fps", 2.0)
    tok = casa.get_tokenizer()
    stop = tok.encode(casa.ENDOFTEXT, allowed_special={casa.ENDOFTEXT})[0]
    results, refs, last_clip = {}, [], None
    for path, (model, _) in zip(paths, models):
        model.eval()
        stream_clips, refs = [], []
        for i in indices:
            frames, prompts, r, _, _ = load_frames(args, model.config.image_size, folder, clips[i], i)
            stream_clips.append((frames, prompts))
            last_clip = frames
            refs += r if r is not None else [None] * len(frames)
        bound = {}
        if args.recent_tokens and not model.config.keeps_every_frame:
            bound = dict(sink_tokens=args.sink_tokens, recent_tokens=args.recent_tokens)
        caption_stream(model, tok, stream_clips[:1], fps, args.max_new_tokens, stop, bound)  # warm-up, untimed
        results[path] = caption_stream(model, tok, stream_clips, fps, args.max_new_tokens, stop, bound,
                                       args.one_stream)
    names = [f"{m.config.variant} ({os.path.basename(os.path.dirname(p)) or p})" for p, (m, _) in zip(paths, models)]
    print(f"live captioning, side by side: clips {args.clip} of {folder}/val.jsonl played back to back "
          f"{'through one cache' if args.one_stream else 'with a fresh cache per clip'}, "
          f"{len(refs)} frames at {fps:g} fps (a frame every {1000 / fps:.0f} ms), {device}, "
          f"{torch.get_num_threads()} thread(s); simulated real time: a turn starts when its frame has arrived and "
          "the model is free, and takes its measured compute time; delay = when its caption is ready - the frame's time")
    print(" frame | video t | " + " | ".join(f"{n}: delay, caption" for n in names))
    for i in range(len(refs)):
        cells = [f"{results[p][i]['delay']:+6.2f}s {results[p][i]['text']}" for p in paths]
        print(f"{i:6d} | {i / fps:6.2f}s | " + " | ".join(cells) + (f"   [ref: {refs[i]}]" if refs[i] else ""))
    n = max(1, len(refs) // 10)
    for name, p in zip(names, paths):
        r = results[p]
        right = sum(x["text"].strip() == ref.strip() for x, ref in zip(r, refs) if ref is not None)
        print(f"{name}: compute per frame {1000 * sum(x['compute'] for x in r) / len(r):.1f} ms on average "
              f"(frame interval {1000 / fps:.0f} ms); delay over the first 10% of frames "
              f"{sum(x['delay'] for x in r[:n]) / n:+.2f}s, last 10% {sum(x['delay'] for x in r[-n:]) / n:+.2f}s, "
              f"max {max(x['delay'] for x in r):+.2f}s; exactly right {right}/{sum(ref is not None for ref in refs)}")
    if args.compare_png:  # the last clip: where a model that fell behind is furthest behind
        k = len(last_clip)
        plots.caption_strip(last_clip, names, [results[p][-k:] for p in paths], refs[-k:], fps, args.compare_png)
        print(f"wrote {args.compare_png}")
    if args.compare_json:
        with open(args.compare_json, "w") as f:
            json.dump(dict(fps=fps, clips=args.clip, names=names, refs=refs, results=[results[p] for p in paths]), f)
        print(f"wrote {args.compare_json}")
    return results


# -----------------------------------------------------------------------------
# Benchmark


def parse_bytes(text):
    """'2GB' -> 2e9, '512MiB' -> 536870912, '1e9' -> 1e9 (bytes); empty: None (no limit)."""
    if text is None or text == "":
        return None
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 1e3, "mb": 1e6, "gb": 1e9,
             "k": 1e3, "m": 1e6, "g": 1e9, "b": 1}
    t = str(text).strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * units[unit])
    return int(float(t))


def format_bytes(n):
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / 1024:.0f} KiB"


def bench_config(args, variant):
    """The benchmark backbone as `variant`: N image tokens = (image_size / patch_size)^2."""
    grid = math.isqrt(args.image_tokens)
    if grid * grid != args.image_tokens:
        raise ValueError(f"--image_tokens must be a square (a grid of patches), got {args.image_tokens}")
    return casa.Config(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                       image_size=grid * args.patch_size, patch_size=args.patch_size,
                       n_vis_layer=args.n_vis_layer, n_vis_head=args.n_vis_head, n_vis_embd=args.n_vis_embd,
                       variant=variant)


def held_bytes(model, cache):
    """CPU stand-in for peak memory: bytes of the parameters plus the KV cache's tensors as
    allocated (every store's full capacity, unused slots included)."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) + cache.allocated_bytes()


def one_turn(model, prompt, frame, m, cache):
    """One streaming turn: model.generate_tokens greedy (no stop token), timed in two parts: the
    first token (frame encoding + prefill of marker and <|answer|>), then the other m - 1 and the
    feeding of all m into the cache. Returns (ttft_s, decode_s, generated ids (1, m))."""
    device = str(prompt.device)
    sync(device)
    t0 = time.perf_counter()
    tokens = model.generate_tokens(prompt, frame, max_new_tokens=m, temperature=0, cache=cache)
    out = [next(tokens)]
    sync(device)
    t1 = time.perf_counter()
    out += list(tokens)  # runs to the end: the m-th token goes into the cache too
    sync(device)
    return t1 - t0, time.perf_counter() - t1, torch.cat(out, dim=1)


class Session:
    """One variant with random weights streaming into its own cache, one turn at a time."""

    def __init__(self, args, variant, device, frames):
        torch.manual_seed(args.seed)
        self.variant, self.device = variant, device
        # the text-only reference: ca's model (same weights) fed the same turns, a plain byte in place
        # of the <|image|> marker and no frame, so every turn adds the same T text tokens
        self.text_only = variant == TEXT_ONLY
        self.config = bench_config(args, "ca" if self.text_only else variant)
        self.model = casa.VLM(self.config).to(device).eval()
        self.frames = [None] if self.text_only else frames
        self.N = 0 if self.text_only else self.config.n_image_tokens
        marker = "\n" if self.text_only else casa.IMAGE
        self.prompt = torch.tensor([casa.encode_turn(casa.get_tokenizer(), marker)[0]], device=device)
        self.m = args.gen_tokens
        self.T = self.prompt.size(1) + self.m  # text tokens a turn leaves in the cache: marker, <|answer|>, m generated
        self.bound = dict(sink_tokens=args.sink_tokens, recent_tokens=args.recent_tokens or None)
        # reserve the whole session's cache up front (no call ever grows a store, so none stalls),
        # sized by the same formula the benchmark checks the cache against; under --max_memory the
        # caches grow instead, so that memory is spent only as the stream goes on
        grow = args.grow or args.max_memory
        reserve = None if grow else casa.kv_cache_entries(self.config, args.turns, self.T, self.N, **self.bound)
        self.params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.elem = next(self.model.parameters()).element_size()
        self.records, self.failures, self.stopped, self.last_peak, self.seconds = [], [], None, 0, 0.0
        # warm-up on a throwaway cache: one-time costs (allocator, kernel choice, lazy init) are
        # paid here, so the first timed turns measure streaming and not start-up
        warm = self.model.new_cache(1, **self.bound)
        for i in range(args.warmup):
            one_turn(self.model, self.prompt, self.frames[i % len(self.frames)], self.m, warm)
        self.cache = self.model.new_cache(1, capacity=reserve, **self.bound)

    def fits(self, k, budget):
        """Would turn k (k turns done) stay within the budget? Projected memory: the last turn's
        peak, or the weights plus twice the formula's KV after the turn (the store may double)."""
        kv = casa.kv_cache_bytes(self.config, k + 1, self.T, self.N, bytes_per_value=self.elem, **self.bound)
        return budget is None or max(self.last_peak, self.params + 2 * kv) <= budget

    def turn(self, k, log=print):
        cuda = self.device.startswith("cuda")
        if cuda:  # every variant's model and cache sit on the GPU: count only this one's
            others = torch.cuda.memory_allocated() - held_bytes(self.model, self.cache)
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ttft, decode, _ = one_turn(self.model, self.prompt, self.frames[k % len(self.frames)], self.m, self.cache)
        self.seconds += time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - others if cuda else held_bytes(self.model, self.cache)
        entries, nbytes = self.cache.entries(), self.cache.nbytes()
        want_entries = casa.kv_cache_entries(self.config, k + 1, self.T, self.N, **self.bound)
        want_bytes = casa.kv_cache_bytes(self.config, k + 1, self.T, self.N, bytes_per_value=self.elem, **self.bound)
        if entries != want_entries or nbytes != want_bytes:
            self.failures.append(f"{self.variant} turn {k}: entries {entries} (formula {want_entries}), "
                                 f"bytes {nbytes} (formula {want_bytes})")
            if len(self.failures) <= 3:
                log(f"FAIL: {self.failures[-1]}")
        self.records.append(dict(variant=self.variant, turn=k, ttft_ms=1000 * ttft, decode_tok_s=self.m / decode,
                                 cached_entries=sum(entries.values()), kv_bytes=nbytes, peak_bytes=peak))
        self.last_peak = peak


@torch.inference_mode()
def run_bench(args, log=print):
    """The benchmark as a function: returns the list of per-turn records (also written to
    args.json / drawn to args.png when set). Raises SystemExit if the cache disagrees with the formula.
    The variants run interleaved, turn k of each before turn k + 1 of any, so that a change in the
    machine's load (other processes) hits every variant at the same turns."""
    device = casa.pick_device(args.device)
    args.max_memory = parse_bytes(args.max_memory)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.gen_tokens < 1 or args.turns < 1:
        raise ValueError("--gen_tokens and --turns must be at least 1")
    for v in variants:
        if v not in casa.VARIANTS:
            raise ValueError(f"unknown variant {v!r}; choose from {', '.join(casa.VARIANTS)}")
    if args.recent_tokens:  # a bounded cache needs one image in the CA layers: the others are shown by formula
        keeps_frames = [v for v in variants if casa.Config(variant=v).keeps_every_frame]
        variants = [v for v in variants if v not in keeps_frames]
        if not variants:
            raise ValueError("--recent_tokens bounds the text cache of variants with one image in their CA layers; "
                             f"{', '.join(keeps_frames)} keep every frame: pick e.g. --variants=ca")
    if args.text_only:
        variants.append(TEXT_ONLY)
    c = bench_config(args, variants[0] if variants[0] != TEXT_ONLY else "ca")
    gen = torch.Generator().manual_seed(args.seed)
    frames = [torch.rand(1, 3, c.image_size, c.image_size, generator=gen).to(device) for _ in range(8)]
    T = 2 + args.gen_tokens
    peak_kind = ("torch.cuda.max_memory_allocated during the turn (reset each turn), less what the other "
                 "variants' models and caches hold" if device.startswith("cuda") else
                 "parameters + KV tensors as allocated (capacity incl. unused slots)")
    log(f"bench: {args.turns} turns, N={c.n_image_tokens} image tokens + T={T} text tokens per turn "
        f"(<|image|> <|answer|> + {args.gen_tokens} generated, all cached); backbone n_layer={c.n_layer} "
        f"n_embd={c.n_embd} n_head={c.n_head}, vision {c.n_vis_layer}x{c.n_vis_embd}; random weights, batch 1, "
        f"{device}, {torch.get_num_threads()} threads; {args.warmup} warm-up turns on a throwaway cache; "
        f"variants interleaved turn by turn")
    log(f"TTFT = frame encoding + prefill of <|image|><|answer|> to the first token's logits; decode tok/s = "
        f"{args.gen_tokens} / time of the {args.gen_tokens} one-token forwards that follow (as model.generate)")
    log(f"cached entries = sum over layer kinds of entries per layer (self-attn + CA image + CA window text); "
        f"peak = {peak_kind}")
    t_start = time.perf_counter()
    sessions = [Session(args, v, device, frames) for v in variants]
    for k in range(args.turns):
        for s in sessions:
            if s.stopped is None and not s.fits(k, args.max_memory):
                s.stopped = k
            if s.stopped is None:
                s.turn(k, log)
    for s in sessions:
        note = f", stopped at turn {s.stopped}" if s.stopped is not None else ""
        log(f"  {s.variant}: {len(s.records)} turns, {s.seconds:.1f}s{note}")
    log(f"total {time.perf_counter() - t_start:.1f}s")
    records = [r for s in sessions for r in s.records]
    log(summary_table(sessions, args))
    if args.recent_tokens:  # what insertion would hold for the same stream (it cannot be bounded)
        ins = bench_config(args, "insertion")
        kv = casa.kv_cache_bytes(ins, args.turns, T, bytes_per_value=sessions[0].elem)
        log(f"insertion on the same stream (casa.kv_cache_bytes, unbounded): {format_bytes(kv)} after {args.turns} turns")
    failures = [f for s in sessions for f in s.failures]
    n = len(records)
    log(f"formula check (cache.entries() == kv_cache_entries, cache.nbytes() == kv_cache_bytes): "
        f"{'all ' + str(n) + ' turns match' if not failures else f'FAIL on {len(failures)} of {n} turns'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=0)
        log(f"wrote {len(records)} records to {args.json}")
    if args.png and records:
        plots.line_panels(records, args.png, PANELS, title=f"streaming, {c.n_image_tokens} image + {T} text tokens per turn, "
                 f"{c.n_layer}x{c.n_embd} backbone, {device}")
        log(f"wrote {args.png}")
    if failures:
        raise SystemExit(f"FAIL: the cache disagrees with casa's formula on {len(failures)} turns: {failures[0]}")
    return records


def ttft_stats(ttft):
    """Per-turn times to first token (ms) -> median, p99, max, and growth: the mean of the last 10%
    of turns over the mean of the first 10%."""
    import statistics

    t, n = sorted(ttft), max(1, len(ttft) // 10)
    return dict(median=statistics.median(t), p99=t[round(0.99 * (len(t) - 1))], max=t[-1],
                first=statistics.mean(ttft[:n]), last=statistics.mean(ttft[-n:]),
                growth=statistics.mean(ttft[-n:]) / statistics.mean(ttft[:n]))


def summary_table(sessions, args):
    """Markdown table: TTFT median / p99 / max (a stall shows as max far above the median) and its
    growth; the other columns are means over the first 10% of turns -> the last 10%."""
    rows = ["| variant | #KV (per layer) | TTFT ms median | p99 | max | max / median | TTFT growth | "
            "decode tok/s | cached entries | KV MiB | peak MiB | note |", "|---" * 12 + "|"]
    for s in sessions:
        v, recs = s.variant, s.records
        kv = "kT" if s.text_only else casa.kv_formula(s.config)
        note = f"stopped at turn {s.stopped} (budget {format_bytes(args.max_memory)})" if s.stopped is not None else ""
        if not recs:
            rows.append(f"| {v} | {kv} |" + " |" * 9 + f" {note} |")
            continue
        n = max(1, len(recs) // 10)
        first, last = recs[:n], recs[-n:]

        def span(key, fmt, scale=1.0):
            a = sum(r[key] for r in first) / n * scale
            b = sum(r[key] for r in last) / n * scale
            return f"{a:{fmt}} → {b:{fmt}}"

        t = ttft_stats([r["ttft_ms"] for r in recs])
        rows.append(f"| {v} | {kv} | {t['median']:.1f} | {t['p99']:.1f} | {t['max']:.1f} | {t['max'] / t['median']:.2f} | "
                    f"{t['growth']:.2f} | {span('decode_tok_s', '.0f')} | {span('cached_entries', '.0f')} | "
                    f"{span('kv_bytes', '.2f', 1 / MiB)} | {span('peak_bytes', '.1f', 1 / MiB)} | {note} |")
    return "\n".join(rows)


def ratios(records):
    """Per variant: TTFT statistics (ttft_stats), insertion's last-10% mean over this variant's, and
    this variant's growth over the text-only reference's (1.0: the growth is the text cache's)."""
    out = {}
    for v in dict.fromkeys(r["variant"] for r in records):
        out[v] = ttft_stats([r["ttft_ms"] for r in records if r["variant"] == v])
    for v in out:
        if "insertion" in out:
            out[v]["insertion_over_this"] = out["insertion"]["last"] / out[v]["last"]
        if TEXT_ONLY in out:
            out[v]["growth_over_text_only"] = out[v]["growth"] / out[TEXT_ONLY]["growth"]
    return out


# what the benchmark picture shows: KV bytes in use and time to first token against the turn (the
# caches are reserved up front, so allocated memory is flat by design; the table has it)
PANELS = (("kv_bytes", "KV cache in use (MiB)", 1 / MiB), ("ttft_ms", "time to first token (ms)", 1.0))


# -----------------------------------------------------------------------------
# Analytic: the paper's backbones. casa.kv_cache_bytes assumes as many K/V heads as query heads;
# for grouped-query attention a cached entry of one layer holds 2 * n_kv_heads * head_dim values.

PRESETS = {
    "Helium1-2B": dict(n_layer=24, n_head=20, n_kv_head=20, head_dim=128,
                       source="kyutai/helium-1-preview-2b config.json (hidden 2560, no GQA); "
                              "ASSUMED the same for the final helium-1-2b"),
    "Qwen2.5-VL-3B": dict(n_layer=36, n_head=16, n_kv_head=2, head_dim=128,
                          source="Qwen/Qwen2.5-VL-3B-Instruct config.json (hidden 2048, GQA)"),
}


def analytic_rows(preset, image_tokens, text_tokens, budget=80e9, bytes_per_value=2):
    """Per variant: KV bytes per turn (after the first turn, i.e. the growth per turn), KV after 1
    and 256 turns, and the first turn whose cache exceeds the budget."""
    p = PRESETS[preset]
    per_entry = 2 * p["n_kv_head"] * p["head_dim"] * bytes_per_value  # K and V of one token, one layer
    rows = []
    for v in casa.VARIANTS:
        config = casa.Config(n_layer=p["n_layer"], variant=v)
        n_sa, n_ca = config.layer_counts()

        def kv(k):
            e = casa.kv_cache_entries(config, k, text_tokens, image_tokens)
            return per_entry * (n_sa * e["self_attn"] + n_ca * (e["cross_attn_image"] + e["cross_attn_text"]))

        growth = kv(2) - kv(1)  # every turn after the first adds exactly this
        over = 1 if kv(1) > budget else 1 + math.floor((budget - kv(1)) / growth) + 1
        rows.append(dict(variant=v, formula=casa.kv_formula(config), per_turn=growth, kv_1=kv(1), kv_256=kv(256),
                         turn_over_budget=over))
    return rows


def analytic(args):
    T = args.text_tokens
    try:
        image_tokens = [int(n) for n in args.analytic_image_tokens.split(",")]
    except ValueError:
        raise ValueError(f"--analytic_image_tokens takes a comma list of numbers (256,1024), "
                         f"got {args.analytic_image_tokens!r}") from None
    print(f"KV cache (keys + values, every layer, bf16), T={T} text tokens per turn; 'over 80 GB' = first turn whose "
          "KV cache alone exceeds 80e9 bytes (weights and activations come on top)")
    for name, p in PRESETS.items():
        print(f"\n{name}: {p['n_layer']} layers, {p['n_head']} heads of {p['head_dim']}, {p['n_kv_head']} K/V heads "
              f"-> {2 * p['n_kv_head'] * p['head_dim'] * 2 * p['n_layer'] / 1024:.0f} KiB per token over all layers\n"
              f"  sizes from {p['source']}")
        for N in image_tokens:
            print(f"  N={N} image tokens per frame")
            print(f"    {'variant':<11} {'#KV':<32} {'per turn':>11} {'after 256 turns':>16} {'over 80 GB at turn':>19}")
            for r in analytic_rows(name, N, T):
                print(f"    {r['variant']:<11} {r['formula']:<32} {format_bytes(r['per_turn']):>11} "
                      f"{format_bytes(r['kv_256']):>16} {r['turn_over_budget']:>19,}")


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.analytic:
        analytic(args)
    elif args.bench:
        records = run_bench(args)
        for v, x in ratios(records).items():
            extra = ""
            if v != "insertion" and "insertion_over_this" in x:
                extra += f"; insertion / {v}, last 10%: {x['insertion_over_this']:.1f}x"
            if v != TEXT_ONLY and "growth_over_text_only" in x:
                extra += f"; growth / text-only growth: {x['growth_over_text_only']:.3f}"
            print(f"TTFT {v}: first 10% {x['first']:.1f} ms -> last 10% {x['last']:.1f} ms, growth {x['growth']:.3f}, "
                  f"median {x['median']:.1f}, max {x['max']:.1f} ms ({x['max'] / x['median']:.2f} x median){extra}")
    elif args.compare:
        return compare(args)
    elif args.ckpt:
        return live(args)
    else:
        raise SystemExit("error: give --ckpt=PATH (live captioning), --bench or --analytic; --help lists the settings")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, IndexError, ValueError) as e:  # bad input: one line, no traceback
        raise SystemExit(f"error: {e}") from None
