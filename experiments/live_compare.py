"""
Live captioning by several checkpoints side by side: the chosen validation clips played back to
back as one stream at --fps, each model captioning every frame greedily, on a simulated real-time
clock (a turn starts when its frame has arrived and the model is free): whose delay grows, whose
does not. Each turn is stream.py's one_turn, the one live captioning runs.

    python -m experiments.live_compare --ckpts=runs/video/ca-s1/ckpt.pt,runs/video/insertion-s1/ckpt.pt \\
        --clip=0-9 --fps=20
    # docs/live_compare.png: one endless stream, one cache per model across the clips, CA's text cache bounded
    python -m experiments.live_compare --ckpts=runs/video/ca-s1/ckpt.pt,runs/video/insertion-s1/ckpt.pt \\
        --clip=0-39 --fps=20 --clip_prompts --one_stream --sink_tokens=4 --recent_tokens=64 --threads=1 \\
        --png=docs/live_compare.png

Prints each frame's delay and caption per model and a summary; --json keeps every frame's times and
captions, --png draws the last clip's frames with each model's captions and delays.
"""

import json as json_lib  # "json" is a setting below (--json=PATH)
import os
import sys

import torch

import casa
import configurator
import stream
from experiments import plots
from experiments.runs import check_picture

# -----------------------------------------------------------------------------
ckpts = ""  # the checkpoints, a comma list (a.pt,b.pt): each captions the same clips
clip = "0"  # clip(s) of the dataset's val.jsonl, played back to back: 3, 0-9 or all
data = ""  # dataset folder; empty: the first checkpoint's, else data/video
fps = 0.0  # frames per second; 0: the first clip's, else 2
prompt = casa.IMAGE  # each turn's prompt, with one <|image|> marker
clip_prompts = False  # use the clips' own prompts (e.g. their final question)
max_new_tokens = 64  # bytes: a caption of n characters takes n tokens
one_stream = False  # the clips go through ONE cache, one long conversation (each model's cache reserved for
# the whole stream), instead of a fresh cache per clip; add recent_tokens to bound CA's
sink_tokens = 0  # with recent_tokens: the first tokens every bounded cache keeps (StreamingLLM's sinks)
recent_tokens = 0  # > 0: bound the text cache of models with one image in their CA layers to sink + recent
json = ""  # write every frame's times and captions here
png = ""  # draw the last clip's frames with each model's captions and delays here
device = "auto"
threads = 0  # CPU threads for torch (0: the cores that are idle now, casa.pick_threads)
# -----------------------------------------------------------------------------


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
    dev = model.lm_head.weight.device
    clock, out = 0.0, []
    if one_stream:
        n_frames = sum(len(f) for f, _ in clips)
        longest = max(len(casa.encode_turn(tok, p)[0]) for _, prompts in clips for p in prompts)
        cache = model.new_cache(1, capacity=casa.kv_cache_entries(model.config, n_frames, longest + max_new_tokens,
                                                                   **bound), **bound)
    for frames, prompts in clips:
        if not one_stream:
            cache = model.new_cache(1, **bound)
        for frame, p in zip(frames, prompts):
            arrival = len(out) / fps
            ids = torch.tensor([casa.encode_turn(tok, p)[0]], device=dev)
            new, _, compute = stream.one_turn(model, ids, frame[None].to(dev), cache, max_new_tokens, stop=stop)
            clock = max(arrival, clock) + compute
            text = tok.decode([t for t in new if t != stop]).replace("\n", " ")
            out.append(dict(arrival=arrival, done=clock, compute=compute, delay=clock - arrival, text=text,
                            kv_bytes=cache.nbytes()))
    return out


def main(argv=None):
    """The command line (default: sys.argv[1:]) -> {checkpoint: [one dict per frame]}. Bad input (a
    setting, a file, a checkpoint) ends it with one line: SystemExit("error: ...")."""
    configurator.apply(globals(), argv)
    try:
        return compare()
    except (OSError, ValueError) as e:  # bad input: one line (torch's messages may span several), no traceback
        sys.exit("error: " + " ".join(str(e).split()))


@torch.inference_mode()
def compare():
    """main() with the settings read: caption, print, and write what was asked."""
    paths = [p for p in ckpts.split(",") if p]
    if not paths:
        raise ValueError("give the checkpoints to compare: --ckpts=a.pt,b.pt")
    for name, ok, rule in [("fps", fps == 0 or 1 / stream.MAX_FPS <= fps <= stream.MAX_FPS,
                            f"0 (the first clip's) or a rate from {1 / stream.MAX_FPS:g} to {stream.MAX_FPS:g}"),
                           ("max_new_tokens", max_new_tokens >= 1, "at least 1"),
                           ("sink_tokens", sink_tokens >= 0, "0 or more"),
                           ("recent_tokens", recent_tokens >= 0, "0 (unbounded) or more"),
                           ("threads", threads >= 0, "0 (the idle cores) or more")]:
        if not ok:
            raise ValueError(f"--{name} must be {rule}, got {globals()[name]!r}")
    if prompt.count(casa.IMAGE) != 1 or casa.ANSWER in prompt or casa.ENDOFTEXT in prompt:
        raise ValueError(f"--prompt needs exactly one {casa.IMAGE} marker (the frame) and no {casa.ANSWER} or "
                         f"{casa.ENDOFTEXT} (the model writes those), got {prompt!r}")
    if png:
        check_picture("png", png)
    if json and os.path.isdir(json):
        raise ValueError(f"--json={json} is a folder: give a file name")
    torch.set_num_threads(casa.pick_threads(threads)[0])
    dev = casa.pick_device(device)
    models = [stream.load_model(p, dev) for p in paths]
    folder, samples, rates = stream.read_clips(data, models[0][1])
    indices = stream.clip_indices(str(clip), len(samples))
    rate = fps or rates[indices[0]]
    tok = casa.get_tokenizer()
    stop = tok.encode(casa.ENDOFTEXT, allowed_special={casa.ENDOFTEXT})[0]
    results, refs, last_clip = {}, [], None
    for path, (model, _) in zip(paths, models):
        stream_clips, refs = [], []
        for i in indices:
            frames, prompts, r = stream.clip_frames(samples[i], model.config.image_size, prompt, clip_prompts)
            stream_clips.append((frames, prompts))
            last_clip = frames
            refs += r if r is not None else [None] * len(frames)
        bound = {}
        if recent_tokens and not model.config.keeps_every_frame:
            bound = dict(sink_tokens=sink_tokens, recent_tokens=recent_tokens)
        caption_stream(model, tok, stream_clips[:1], rate, max_new_tokens, stop, bound)  # warm-up, untimed
        results[path] = caption_stream(model, tok, stream_clips, rate, max_new_tokens, stop, bound, one_stream)
    names = [f"{m.config.variant} ({os.path.basename(os.path.dirname(p)) or p})" for p, (m, _) in zip(paths, models)]
    print(f"live captioning, side by side: clips {clip} of {folder}/val.jsonl played back to back "
          f"{'through one cache' if one_stream else 'with a fresh cache per clip'}, "
          f"{len(refs)} frames at {rate:g} fps (a frame every {1000 / rate:.0f} ms), {dev}, "
          f"{torch.get_num_threads()} thread(s); simulated real time: a turn starts when its frame has arrived and "
          "the model is free, and takes its measured compute time; delay = when its caption is ready - the frame's time")
    print(" frame | video t | " + " | ".join(f"{n}: delay, caption" for n in names))
    for i in range(len(refs)):
        cells = [f"{results[p][i]['delay']:+6.2f}s {results[p][i]['text']}" for p in paths]
        print(f"{i:6d} | {i / rate:6.2f}s | " + " | ".join(cells) + (f"   [ref: {refs[i]}]" if refs[i] else ""))
    n = max(1, len(refs) // 10)
    for name, p in zip(names, paths):
        r = results[p]
        right = sum(x["text"].strip() == ref.strip() for x, ref in zip(r, refs) if ref is not None)
        print(f"{name}: compute per frame {1000 * sum(x['compute'] for x in r) / len(r):.1f} ms on average "
              f"(frame interval {1000 / rate:.0f} ms); delay over the first 10% of frames "
              f"{sum(x['delay'] for x in r[:n]) / n:+.2f}s, last 10% {sum(x['delay'] for x in r[-n:]) / n:+.2f}s, "
              f"max {max(x['delay'] for x in r):+.2f}s; exactly right {right}/{sum(ref is not None for ref in refs)}")
    if png:  # the last clip: where a model that fell behind is furthest behind
        k = len(last_clip)
        plots.caption_strip(last_clip, names, [results[p][-k:] for p in paths], refs[-k:], rate, png)
        print(f"wrote {png}")
    if json:
        os.makedirs(os.path.dirname(json) or ".", exist_ok=True)
        with open(json, "w") as f:
            json_lib.dump(dict(fps=rate, clips=clip, names=names, refs=refs, results=[results[p] for p in paths]), f)
        print(f"wrote {json}")
    return results


if __name__ == "__main__":
    main()
