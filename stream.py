"""
stream.py: stream video into a vision-language model, one frame per turn, through ONE persistent
KV cache; and measure why cross-attention stays flat where token insertion grows.

  live captioning   python stream.py --ckpt=out/ckpt.pt [--clip=0 | --clip=0-9 | --frames=DIR] [--fps=2]
      Frames of a clip (the checkpoint's dataset, val.jsonl) or a folder of images (sorted by name)
      arrive in simulated real time: frame i at i/fps seconds. Each frame is one turn,
      "<|image|><|answer|>" + the model's commentary, appended to the same cache. One line per frame:
      its time in the video, when the line was ready (wall clock since the start) and the delay.
      A dataset of one-image lines (shapes, most own data) streams each line as a clip of one frame,
      asked its own question; so any checkpoint streams its dataset, or a folder of frames.

  benchmark         python stream.py --bench [--turns=300] [--image_tokens=64] [--gen_tokens=8] [--json=PATH]
      Every variant on the same backbone with random weights, batch 1, K turns of one N-token frame
      plus m greedy tokens. Per turn: time to first token (TTFT), decode speed, cached entries, KV
      bytes, peak memory; the measured cache is checked against casa.kv_cache_bytes/kv_cache_entries.
      Caches are reserved for the whole session (no turn stalls on a copy; --grow to see the stalls),
      and a text-only row (ca's model, no image) shows how much growth the text cache alone causes.
      --recent_tokens=W [--sink_tokens=S] bounds the self-attention cache (StreamingLLM) for endless
      streams: CA variants then forget old text only, insertion old frames too.
      Prints a table (TTFT median / p99 / max, and its growth: the last 10% of turns over the first
      10%) and writes the per-turn records to --json, which
      python -m experiments.efficiency --stream_json=PATH --png=OUT draws.

Several checkpoints captioning side by side: experiments/live_compare.py. One stream through every cache
policy (full, compressed, windowed insertion; ca with sinks and windows): experiments/stream_policies.py.
The KV cache of the paper's backbones: experiments/kv_projection.py. A bad setting, file or checkpoint ends the script with one line
that says what is wrong.
"""

import json as json_lib  # "json" is a setting below (--json=PATH)
import math
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

import casa
import configurator
from data.loader import load_image, read_lines, read_split

# -----------------------------------------------------------------------------
# settings; each can be set as --name=value or --name value, a boolean as a bare --name
device = "auto"  # auto: cuda, then mps, then cpu; or a torch device name
seed = 1337
threads = 0  # CPU threads for torch (0: the cores that are idle now, casa.pick_threads); 1 keeps timings stable
# live captioning
ckpt = ""  # a checkpoint (casa.save_checkpoint format) to caption with
clip = "0"  # clip(s) of the dataset's val.jsonl: 3, 0-9 or all; each its own stream, summed up at the end
frames = ""  # a folder of images (sorted by name) instead of a clip
data = ""  # dataset folder; empty: the checkpoint's, else data/video
fps = 0.0  # frames per second; 0: the clip's, else 2
prompt = casa.IMAGE  # each turn's prompt, with one <|image|> marker
clip_prompts = False  # use the clip's own prompts (e.g. its final question)
max_new_tokens = 64  # bytes: a caption of n characters takes n tokens (the longest built-in one: 48)
temperature = 0.0  # 0: greedy
top_k = 0  # 0: off
no_wait = False  # don't wait for a frame's real arrival time
# benchmark
bench = False  # run the streaming benchmark
turns = 300
image_tokens = 64  # N, a square: (image_size / patch_size)^2
gen_tokens = 8  # m tokens generated (and cached) per turn
variants = ",".join(casa.VARIANTS)
warmup = 3  # untimed turns on a throwaway cache first
text_only = True  # add the reference row: ca's model fed the same turns with no image (its text cache alone)
grow = False  # let the caches double when full instead of reserving the session's size (shows the stalls;
# always so with max_memory)
sink_tokens = 0  # with recent_tokens: the first tokens every bounded cache keeps (StreamingLLM's sinks)
recent_tokens = 0  # > 0: bound the self-attention cache to sink_tokens + recent_tokens (insertion: frames too)
# a wide, shallow backbone: at batch 1 every step reads the weights and the whole KV cache, and CA's
# text cache after k turns, kT entries of 2*n_embd floats per layer, is kT/(8*n_embd) of the weights
# (~16*n_embd^2 per layer). A wide n_embd keeps that share small, so what the table shows is the
# fusion design's cost, not the text cache's (the text-only row measures the latter).
n_layer = 2
n_head = 16
n_embd = 1024
patch_size = 4
n_vis_layer = 2
n_vis_head = 4
n_vis_embd = 128
max_memory = ""  # e.g. 2GB, 512MiB: stop a variant before a turn whose projected memory, max(last turn's
# peak, weights + 2 x the formula's KV after it: the store may double), passes it; empty: no limit
json = ""  # write the per-turn records here
# -----------------------------------------------------------------------------
DEFAULTS = configurator.settings(globals())  # what benchmark(**settings) starts from
HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MiB = 2**20
MAX_FPS = 1000.0  # a frame a millisecond; --fps (and a clip's fps) lies between 1/MAX_FPS and MAX_FPS
TEXT_ONLY = "text only"  # the benchmark's reference row: no image at all


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    elif str(device).startswith("mps"):
        torch.mps.synchronize()


def check_settings(s):
    """Every setting of s (stream.py's settings) in its range, or one ValueError that names it and what
    it takes: checked when the settings are read, before any work."""
    rules = [("seed", s.seed >= 0, "0 or more"), ("threads", s.threads >= 0, "0 (the idle cores) or more"),
             ("fps", s.fps == 0 or 1 / MAX_FPS <= s.fps <= MAX_FPS,
              f"0 (the clip's) or a rate from {1 / MAX_FPS:g} to {MAX_FPS:g} frames per second"),
             ("max_new_tokens", s.max_new_tokens >= 1, "at least 1"),
             ("temperature", 0 <= s.temperature < math.inf, "0 (greedy) or more"),
             ("top_k", s.top_k >= 0, "0 (off) or more"),
             ("turns", s.turns >= 1, "at least 1"), ("gen_tokens", s.gen_tokens >= 1, "at least 1"),
             ("image_tokens", s.image_tokens >= 1 and math.isqrt(s.image_tokens) ** 2 == s.image_tokens,
              "a square (a grid of patches: 16, 64, 256)"),
             ("warmup", s.warmup >= 0, "0 or more"), ("sink_tokens", s.sink_tokens >= 0, "0 or more"),
             ("recent_tokens", s.recent_tokens >= 0, "0 (unbounded) or more")]
    rules += [(k, getattr(s, k) >= 1, "at least 1")
              for k in ("n_layer", "n_head", "n_embd", "patch_size", "n_vis_layer", "n_vis_head", "n_vis_embd")]
    for name, ok, rule in rules:
        if not ok:
            raise ValueError(f"--{name} must be {rule}, got {getattr(s, name)!r}")
    for special in (casa.ANSWER, casa.ENDOFTEXT):
        if special in s.prompt:
            raise ValueError(f"--prompt contains {special}, which the model writes itself: leave it out")
    if s.prompt.count(casa.IMAGE) != 1:
        raise ValueError(f"--prompt needs exactly one {casa.IMAGE} marker (the frame), got {s.prompt!r}")
    parse_bytes(s.max_memory)  # a size it cannot read raises here
    if s.json and os.path.isdir(s.json):
        raise ValueError(f"--json={s.json} is a folder: give a file name, e.g. runs/stream.json")


def load_model(path, device):
    """casa.load_checkpoint -> (model in eval mode, checkpoint dict). A checkpoint that is missing or
    not one raises OSError or ValueError; one whose weights do not fit its config (a RuntimeError, as
    load_state_dict raises it: several lines, maybe long) raises one ValueError line too."""
    try:
        model, saved = casa.load_checkpoint(path, device=device)
    except RuntimeError as e:
        text = " ".join(str(e).split())[:300]
        raise ValueError(text if str(path) in text else f"cannot load {path}: {text}") from None
    return model.eval(), saved


def one_turn(model, ids, images, cache, max_new_tokens, temperature=0.0, top_k=None, stop=None):
    """One streaming turn, the one every mode runs: the frame images (1, 3, S, S) (None: a text-only
    turn) and the prompt ids (1, T) are appended to the persistent cache, then up to max_new_tokens
    tokens are chosen, each fed to the cache too (model.generate_tokens). Timed in two parts: the
    first token (frame encoding + prefill), then the rest. Returns (new token ids [list, the stop
    token included], seconds to the first token, seconds for the whole turn)."""
    device = ids.device
    sync(device)
    t0 = time.perf_counter()
    tokens = model.generate_tokens(ids, images, max_new_tokens, temperature, top_k, stop, cache)
    out = [next(tokens)]  # (1, 1)
    sync(device)
    t1 = time.perf_counter()
    out += list(tokens)  # runs to the end: the last token goes into the cache too
    sync(device)
    return torch.cat(out, dim=1)[0].tolist(), t1 - t0, time.perf_counter() - t0


# -----------------------------------------------------------------------------
# Live captioning


def find_dataset(data, ckpt):
    """The folder whose val.jsonl live captioning plays: `data` if given, else the checkpoint's dataset
    (its 'dataset_dir', or the 'dataset' setting it was trained with, saved by train.py as
    'train_args'), else, for a checkpoint that names none, data/video. A name like "video" is looked
    up under data/. When there is none, one FileNotFoundError says what is needed."""
    saved = next((ckpt[k] for k in ("train_args", "args") if isinstance(ckpt.get(k), dict)), {})
    named = [c for c in (ckpt.get("dataset_dir"), saved.get("dataset")) if isinstance(c, str) and c]
    candidates = [data] if data else named or ["video"]
    for candidate in candidates:
        for path in (candidate, os.path.join(HERE, candidate), os.path.join(HERE, "data", candidate)):
            if os.path.isfile(os.path.join(path, "val.jsonl")):
                return path
    instead = "give --data=FOLDER (a dataset folder with val.jsonl) or --frames=DIR (a folder of images)"
    if data:
        raise FileNotFoundError(f"--data={data}: no val.jsonl there; {instead}")
    built_in = [c for c in candidates if os.path.isfile(os.path.join(HERE, "data", c, "prepare.py"))]
    make = f"make it with python -m data.{built_in[0]}.prepare, or " if built_in else ""
    whose = "the checkpoint's dataset" if named else "the default dataset (the checkpoint names none)"
    raise FileNotFoundError(f"no val.jsonl for {whose}, {' or '.join(candidates)}: {make}{instead}")


def read_clips(data, ckpt):
    """-> (dataset folder, its validation samples (data.loader.Sample: images, turns, task), the frame
    rate of each, its "fps" field or 2). The folder: find_dataset(data, ckpt). The lines are checked
    as training checks them: a bad one is a ValueError naming its file, line and field."""
    folder = find_dataset(data, ckpt)
    samples = read_split(folder, "val")
    rates = [json_lib.loads(line).get("fps", 2.0) for _, line in read_lines(os.path.join(folder, "val.jsonl"))]
    for sample, rate in zip(samples, rates):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 1 / MAX_FPS <= rate <= MAX_FPS:
            raise ValueError(f"{sample.where}: 'fps' must be a number from {1 / MAX_FPS:g} to {MAX_FPS:g}, "
                             f"got {rate!r}")
    return folder, samples, [float(r) for r in rates]


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
        raise ValueError(f"--clip {spec} out of range: the dataset's val.jsonl has {n} clips (0 to {n - 1})")
    return out


def clip_frames(sample, image_size, prompt, clip_prompts):
    """One validation sample as a clip -> (frames (K, 3, S, S), prompts [K], references [K] or None).
    Each turn asks `prompt`, or with clip_prompts the clip's own. A one-image sample (shapes, most own
    data) is a clip of one frame asked its own question (the image goes first, as in training)."""
    if not sample.images:
        raise ValueError(f"{sample.where}: no image to stream (live captioning needs a frame a turn)")
    frames = torch.stack([load_image(p, image_size) for p in sample.images])
    prompts, answers = [p for p, _ in sample.turns], [a for _, a in sample.turns]
    if len(frames) == 1 and len(prompts) == 1:
        return frames, prompts, answers
    refs = answers if len(answers) == len(frames) else None
    return frames, prompts if clip_prompts and refs else [prompt] * len(frames), refs


def folder_frames(folder, image_size):
    """The images of a folder, sorted by name -> frames (K, 3, S, S)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--frames {folder}: no such folder")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return torch.stack([load_image(os.path.join(folder, f), image_size) for f in names])


@torch.inference_mode()
def live(s):
    """Live captioning of s.frames, or of one or several validation clips (s.clip: 3, 0-9, all), each
    clip its own stream with a fresh cache. Returns the delay of every frame (seconds)."""
    dev = casa.pick_device(s.device)
    model, saved = load_model(s.ckpt, dev)
    train_args = saved.get("train_args") if isinstance(saved.get("train_args"), dict) else {}
    blind = bool(train_args.get("blind", False))
    tok = casa.get_tokenizer()
    S = model.config.image_size
    if s.frames:
        images = folder_frames(s.frames, S)
        streams = [(images, [s.prompt] * len(images), None, 2.0, s.frames)]
    else:
        folder, samples, rates = read_clips(s.data, saved)
        indices = clip_indices(str(s.clip), len(samples))
        streams = ((*clip_frames(samples[i], S, s.prompt, s.clip_prompts), rates[i],  # one clip at a time
                    f"{folder}/val.jsonl clip {i} ({samples[i].task or '?'})") for i in indices)
    delays, right, n = [], [], 0
    for images, prompts, refs, clip_fps, desc in streams:  # (K, 3, S, S), [K], [K] or None
        if blind:  # a blind baseline saw blank images in training: so it does here (as sample.py)
            images, desc = torch.zeros_like(images), desc + ", BLIND (frames blanked)"
        d, r = live_stream(s, model, tok, dev, images, prompts, refs, s.fps or clip_fps, desc)
        delays, right, n = delays + d, right + r, n + 1
    if n > 1:
        print(f"all {n} clips: {len(delays)} frames; delay mean {sum(delays) / len(delays):+.3f}s, "
              f"max {max(delays):+.3f}s" + (f"; exactly right {sum(right)}/{len(right)} ({sum(right) / len(right):.3f})"
                                             if right else ""))
    return delays


def live_stream(s, model, tok, dev, frames, prompts, refs, fps, desc):
    """One stream: frame i arrives at i/fps seconds; its turn, prompt + the model's commentary, goes
    into one cache. Returns (delays, [right] per frame when there are references)."""
    stop = tok.encode(casa.ENDOFTEXT, allowed_special={casa.ENDOFTEXT})[0]
    for p in prompts:
        if p.count(casa.IMAGE) != 1:
            raise ValueError(f"{desc}: each turn's prompt needs exactly one {casa.IMAGE} marker (the frame), "
                             f"got {p!r}")
    print(f"live captioning: {len(frames)} frames of {desc} at {fps:g} fps, variant {model.config.variant}, "
          f"{dev}{', no waiting for real time' if s.no_wait else ''}")
    print(" video t | ready at |  delay | commentary    (delay = ready - the frame's time; < 0: ahead of the video)")
    cache = model.new_cache(1)
    delays, right, start = [], [], time.perf_counter()
    for i, frame in enumerate(frames):
        arrival = i / fps  # frame i arrives i/fps seconds after the start
        if not s.no_wait:  # the model is ahead of the video: wait for the frame
            time.sleep(max(0.0, arrival - (time.perf_counter() - start)))
        ids = torch.tensor([casa.encode_turn(tok, prompts[i])[0]], device=dev)
        new, _, _ = one_turn(model, ids, frame[None].to(dev), cache, s.max_new_tokens, s.temperature,
                             s.top_k or None, stop)
        ready = time.perf_counter() - start
        # one line per frame, whatever line breaks (\n, \r, \x0c...) an untrained model writes; the
        # cache also holds <|endoftext|>
        text = " ".join(tok.decode([t for t in new if t != stop]).splitlines())
        delays.append(ready - arrival)
        ref = ""
        if refs is not None:
            right.append(text.strip() == refs[i].strip())
            ref = f"   [{'ok' if right[-1] else 'ref: ' + refs[i]}]"
        print(f"{arrival:7.2f}s | {ready:7.2f}s | {ready - arrival:+5.2f}s | {text}{ref}", flush=True)
    processing = time.perf_counter() - start
    exact = f"; exactly right {sum(right)}/{len(right)}" if right else ""
    print(f"{len(frames)} frames ({len(frames) / fps:.1f}s of video) in {processing:.2f}s; delay mean "
          f"{sum(delays) / len(delays):+.3f}s, max {max(delays):+.3f}s{exact}; cache {cache.nbytes() / MiB:.2f} MiB, "
          f"entries per layer {cache.entries()}")
    return delays, right


# -----------------------------------------------------------------------------
# Benchmark


def parse_bytes(text):
    """'2GB' -> 2e9, '512MiB' -> 536870912, '1e9' -> 1e9 (bytes); empty: None (no limit). Anything
    else (not a size, 0 or less) raises ValueError."""
    if text is None or text == "":
        return None
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 1e3, "mb": 1e6, "gb": 1e9,
             "k": 1e3, "m": 1e6, "g": 1e9, "b": 1}
    t = str(text).strip().lower()
    unit = next((u for u in sorted(units, key=len, reverse=True) if t.endswith(u)), "")
    try:
        n = float(t[: len(t) - len(unit)]) * units.get(unit, 1)
    except ValueError:
        n = math.nan
    if not 1 <= n < math.inf:
        raise ValueError(f"--max_memory takes a size like 2GB, 512MiB or 1e9 (bytes), got {text!r}")
    return int(n)


def format_bytes(n):
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / 1024:.0f} KiB"


def bench_config(s, variant):
    """The benchmark backbone (s.n_layer, ...) as `variant`: N image tokens = (image_size / patch_size)^2."""
    grid = math.isqrt(s.image_tokens)
    if grid * grid != s.image_tokens:
        raise ValueError(f"--image_tokens must be a square (a grid of patches), got {s.image_tokens}")
    return casa.Config(n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd, image_size=grid * s.patch_size,
                       patch_size=s.patch_size, n_vis_layer=s.n_vis_layer, n_vis_head=s.n_vis_head,
                       n_vis_embd=s.n_vis_embd, variant=variant)


def held_bytes(model, cache):
    """CPU stand-in for peak memory: bytes of the parameters plus the KV cache's tensors as
    allocated (every store's full capacity, unused slots included)."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) + cache.allocated_bytes()


class Session:
    """One model (config) with random weights streaming into its own cache, one turn at a time;
    `bound`: the cache's sink_tokens and recent_tokens (see casa.Cache). `variant` names the row."""

    def __init__(self, s, variant, config, bound, dev, frames, grow):
        torch.manual_seed(s.seed)
        self.variant, self.device, self.config, self.bound = variant, dev, config, bound
        # the text-only reference: ca's model (same weights) fed the same turns, a plain byte in place
        # of the <|image|> marker and no frame, so every turn adds the same T text tokens
        self.text_only = variant == TEXT_ONLY
        self.model = casa.VLM(self.config).to(dev).eval()
        self.frames = [None] if self.text_only else frames
        self.N = 0 if self.text_only else self.config.tokens_per_image
        marker = "\n" if self.text_only else casa.IMAGE
        self.prompt = torch.tensor([casa.encode_turn(casa.get_tokenizer(), marker)[0]], device=dev)
        self.m = s.gen_tokens
        self.T = self.prompt.size(1) + self.m  # text tokens a turn leaves in the cache: marker, <|answer|>, m generated
        # reserve the whole session's cache up front (no call ever grows a store, so none stalls),
        # sized by the same formula the benchmark checks the cache against; under --max_memory the
        # caches grow instead, so that memory is spent only as the stream goes on
        reserve = None if grow else casa.kv_cache_entries(self.config, s.turns, self.T, self.N, **self.bound)
        self.params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.elem = next(self.model.parameters()).element_size()
        self.records, self.failures, self.stopped, self.last_peak, self.seconds = [], [], None, 0, 0.0
        # warm-up on a throwaway cache: one-time costs (allocator, kernel choice, lazy init) are
        # paid here, so the first timed turns measure streaming and not start-up
        warm = self.model.new_cache(1, **self.bound)
        for i in range(s.warmup):
            one_turn(self.model, self.prompt, self.frames[i % len(self.frames)], warm, self.m)
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
        _, ttft, seconds = one_turn(self.model, self.prompt, self.frames[k % len(self.frames)], self.cache, self.m)
        self.seconds += seconds
        peak = torch.cuda.max_memory_allocated() - others if cuda else held_bytes(self.model, self.cache)
        entries, nbytes = self.cache.entries(), self.cache.nbytes()
        want_entries = casa.kv_cache_entries(self.config, k + 1, self.T, self.N, **self.bound)
        want_bytes = casa.kv_cache_bytes(self.config, k + 1, self.T, self.N, bytes_per_value=self.elem, **self.bound)
        if entries != want_entries or nbytes != want_bytes:
            self.failures.append(f"{self.variant} turn {k}: entries {entries} (formula {want_entries}), "
                                 f"bytes {nbytes} (formula {want_bytes})")
            if len(self.failures) <= 3:
                log(f"FAIL: {self.failures[-1]}")
        self.records.append(dict(variant=self.variant, turn=k, ttft_ms=1000 * ttft, turn_s=seconds,
                                 decode_tok_s=self.m / (seconds - ttft),  # the m one-token forwards after the first
                                 cached_entries=sum(entries.values()), kv_bytes=nbytes, peak_bytes=peak))
        self.last_peak = peak


@torch.inference_mode()
def benchmark(log=print, **settings):
    """The benchmark as a function: stream.py's settings at their defaults, `settings` on top
    (benchmark(turns=50, variants="ca,insertion")) -> the list of per-turn records (also written to
    settings' json when set). Raises SystemExit if the cache disagrees with the formula. The variants
    run interleaved, turn k of each before turn k + 1 of any, so that a change in the machine's load
    (other processes) hits every variant at the same turns."""
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"benchmark() got unknown settings: {', '.join(unknown)}")
    s = SimpleNamespace(**{**DEFAULTS, **settings})
    check_settings(s)
    dev = casa.pick_device(s.device)
    budget = parse_bytes(s.max_memory)
    names = [v.strip() for v in s.variants.split(",") if v.strip()]
    if not names:
        raise ValueError(f"--variants names none: give some of {', '.join(casa.VARIANTS)}")
    for v in names:
        if v not in casa.VARIANTS:
            raise ValueError(f"unknown variant {v!r}; choose from {', '.join(casa.VARIANTS)}")
    if s.recent_tokens:  # a window over self-attention does not bound a CA store that keeps every image
        unbounded = [v for v in names if casa.Config(variant=v).ca_all_images and not casa.Config(variant=v).insert_images]
        names = [v for v in names if v not in unbounded]
        if not names:
            raise ValueError(f"--recent_tokens bounds the self-attention cache; {', '.join(unbounded)} keep every "
                             "frame in their CA layers: pick e.g. --variants=ca,insertion")
    if s.text_only:
        names.append(TEXT_ONLY)
    c = bench_config(s, names[0] if names[0] != TEXT_ONLY else "ca")
    if s.json:  # its folder now: a bad path must not cost the whole run
        os.makedirs(os.path.dirname(s.json) or ".", exist_ok=True)
    gen = torch.Generator().manual_seed(s.seed)
    images = [torch.rand(1, 3, c.image_size, c.image_size, generator=gen).to(dev) for _ in range(8)]
    T = 2 + s.gen_tokens
    peak_kind = ("torch.cuda.max_memory_allocated during the turn (reset each turn), less what the other "
                 "variants' models and caches hold" if dev.startswith("cuda") else
                 "parameters + KV tensors as allocated (capacity incl. unused slots)")
    log(f"bench: {s.turns} turns, N={c.n_image_tokens} image tokens + T={T} text tokens per turn "
        f"(<|image|> <|answer|> + {s.gen_tokens} generated, all cached); backbone n_layer={c.n_layer} "
        f"n_embd={c.n_embd} n_head={c.n_head}, vision {c.n_vis_layer}x{c.n_vis_embd}; random weights, batch 1, "
        f"{dev}, {torch.get_num_threads()} threads; {s.warmup} warm-up turns on a throwaway cache; "
        f"variants interleaved turn by turn")
    log(f"TTFT = frame encoding + prefill of <|image|><|answer|> to the first token's logits; decode tok/s = "
        f"{s.gen_tokens} / time of the {s.gen_tokens} one-token forwards that follow (as model.generate)")
    log(f"cached entries = sum over layer kinds of entries per layer (self-attn + CA image + CA window text); "
        f"peak = {peak_kind}")
    t_start = time.perf_counter()
    bound = dict(sink_tokens=s.sink_tokens, recent_tokens=s.recent_tokens or None)
    sessions = [Session(s, v, bench_config(s, "ca" if v == TEXT_ONLY else v), bound, dev, images, grow=s.grow or budget)
                for v in names]
    for k in range(s.turns):
        for x in sessions:
            if x.stopped is None and not x.fits(k, budget):
                x.stopped = k
            if x.stopped is None:
                x.turn(k, log)
    for x in sessions:
        note = f", stopped at turn {x.stopped}" if x.stopped is not None else ""
        log(f"  {x.variant}: {len(x.records)} turns, {x.seconds:.1f}s{note}")
    log(f"total {time.perf_counter() - t_start:.1f}s")
    records = [r for x in sessions for r in x.records]
    log(summary_table(sessions, budget))
    if s.recent_tokens:  # what insertion's full cache would hold for the same stream (its window drops frames)
        kv = casa.kv_cache_bytes(bench_config(s, "insertion"), s.turns, T, bytes_per_value=sessions[0].elem)
        log(f"insertion on the same stream, every frame kept (casa.kv_cache_bytes): {format_bytes(kv)} after "
            f"{s.turns} turns")
    failures = [f for x in sessions for f in x.failures]
    n = len(records)
    log(f"formula check (cache.entries() == kv_cache_entries, cache.nbytes() == kv_cache_bytes): "
        f"{'all ' + str(n) + ' turns match' if not failures else f'FAIL on {len(failures)} of {n} turns'}")
    if s.json:
        with open(s.json, "w") as f:
            json_lib.dump(records, f, indent=0)
        log(f"wrote {len(records)} records to {s.json}")
    if failures:
        raise SystemExit(f"FAIL: the cache disagrees with casa's formula on {len(failures)} turns: {failures[0]}")
    for line in ratio_lines(records):
        log(line)
    return records


def ttft_stats(ttft):
    """Per-turn times to first token (ms) -> median, p99, max, and growth: the mean of the last 10%
    of turns over the mean of the first 10%."""
    t, n = sorted(ttft), max(1, len(ttft) // 10)
    return dict(median=statistics.median(t), p99=t[round(0.99 * (len(t) - 1))], max=t[-1],
                first=statistics.mean(ttft[:n]), last=statistics.mean(ttft[-n:]),
                growth=statistics.mean(ttft[-n:]) / statistics.mean(ttft[:n]))


def summary_table(sessions, budget):
    """Markdown table: TTFT median / p99 / max (a stall shows as max far above the median) and its
    growth; the other columns are means over the first 10% of turns -> the last 10%."""
    rows = ["| variant | #KV (per layer) | TTFT ms median | p99 | max | max / median | TTFT growth | "
            "decode tok/s | cached entries | KV MiB | peak MiB | note |", "|---" * 12 + "|"]
    for x in sessions:
        v, recs = x.variant, x.records
        kv = "kT" if x.text_only else casa.kv_formula(x.config)
        note = f"stopped at turn {x.stopped} (budget {format_bytes(budget)})" if x.stopped is not None else ""
        if not recs:
            rows.append(f"| {v} | {kv} |" + " |" * 9 + f" {note} |")
            continue
        n = max(1, len(recs) // 10)

        def span(key, fmt, scale=1.0):  # mean over the first 10% of turns -> over the last 10%
            a, b = (sum(r[key] for r in part) / n * scale for part in (recs[:n], recs[-n:]))
            return f"{a:{fmt}} → {b:{fmt}}"

        t = ttft_stats([r["ttft_ms"] for r in recs])
        rows.append(f"| {v} | {kv} | {t['median']:.1f} | {t['p99']:.1f} | {t['max']:.1f} | {t['max'] / t['median']:.2f} | "
                    f"{t['growth']:.2f} | {span('decode_tok_s', '.0f')} | {span('cached_entries', '.0f')} | "
                    f"{span('kv_bytes', '.2f', 1 / MiB)} | {span('peak_bytes', '.1f', 1 / MiB)} | {note} |")
    return "\n".join(rows)


def ratio_lines(records):
    """One line per variant: its TTFT statistics (ttft_stats), insertion's last-10% mean over this
    variant's, and this variant's growth over the text-only reference's (1.0: the growth is the
    text cache's)."""
    stats = {v: ttft_stats([r["ttft_ms"] for r in records if r["variant"] == v])
             for v in dict.fromkeys(r["variant"] for r in records)}
    lines = []
    for v, x in stats.items():
        extra = ""
        if v != "insertion" and "insertion" in stats:
            extra += f"; insertion / {v}, last 10%: {stats['insertion']['last'] / x['last']:.1f}x"
        if v != TEXT_ONLY and TEXT_ONLY in stats:
            extra += f"; growth / text-only growth: {x['growth'] / stats[TEXT_ONLY]['growth']:.3f}"
        lines.append(f"TTFT {v}: first 10% {x['first']:.1f} ms -> last 10% {x['last']:.1f} ms, growth "
                     f"{x['growth']:.3f}, median {x['median']:.1f}, max {x['max']:.1f} ms "
                     f"({x['max'] / x['median']:.2f} x median){extra}")
    return lines


# -----------------------------------------------------------------------------


def main(argv=None):
    """The command line (default: sys.argv[1:]) -> the benchmark's records, or live captioning's delays.
    Bad input (a setting, a file, a checkpoint) ends it with one line: SystemExit("error: ...")."""
    configurator.apply(globals(), argv)
    s = SimpleNamespace(**configurator.settings(globals()))
    if not s.bench and not s.ckpt:
        sys.exit("error: give --ckpt=PATH (live captioning) or --bench; --help lists the settings")
    try:
        check_settings(s)
        n, why = casa.pick_threads(s.threads)
        torch.set_num_threads(n)
        print(f"{n} CPU thread(s) ({why})")
        return benchmark(**vars(s)) if s.bench else live(s)
    except (OSError, ValueError) as e:  # bad input: one line (torch's messages may span several), no traceback
        sys.exit("error: " + " ".join(str(e).split()))


if __name__ == "__main__":
    main()
