"""
The paper's Table 1 at toy scale: what each fusion variant costs, on one config: casa.Config()'s,
4 layers x 128, 32x32 images in 4x4 patches -> N = 64 image tokens, so that, as in real VLMs, an
image is several times longer than a turn's text (--patch_size=8: the accuracy runs' 16 tokens).

Training (on the shapes data, batch 32, forward + backward + AdamW step):
  text tok/s       text tokens trained per second (as train.py counts them: padding left out)
  activation MiB   bytes of the tensors autograd keeps for the backward pass in one step (a
                   saved-tensors hook adds them up, weights left out): the part of training memory
                   that grows with the fusion design. On CUDA: peak allocated during a step instead.
Streaming (stream.py's benchmark: batch 1, random weights, one frame then 5 generated tokens per turn):
  frames/s         1 / (time to first token + time of the 5 one-token forwards after it), over the
                   first and the last 10% of turns
  KV MiB, entries  the cache after the last frame (cache.nbytes(), checked against casa.kv_cache_bytes)

    python -m experiments.efficiency                 # ~2 min on one CPU thread
    python -m experiments.efficiency --patch_size=8 --turns=200   # the accuracy runs' 16 image tokens

Numbers go to docs/results/efficiency.md. It also draws the streaming benchmark's picture from the
records stream.py writes (KV cache in use and time to first token against the turn):

    python stream.py --bench --json=runs/stream.json
    python -m experiments.efficiency --stream_json=runs/stream.json --png=docs/stream.png
"""

import json
import statistics
import sys
import time

import torch

import casa
import configurator
import stream
from data.loader import Dataset, resolve_dataset, text_tokens
from experiments import plots
from experiments.runs import (AT_LEAST_1, check_picture, check_settings, is_default, markdown_table, parse_names,
                              write_result)

# -----------------------------------------------------------------------------
variants = ",".join(casa.VARIANTS)
patch_size = 4  # 4: 64 image tokens (casa.Config()); 8: 16 (the accuracy runs)
train_steps = 20
batch_size = 32
turns = 500  # frames streamed
threads = 1
device = "auto"
stream_json = ""  # instead of measuring: draw these records of stream.py --bench --json=PATH ...
png = ""  # ... to this picture (e.g. docs/stream.png)
# -----------------------------------------------------------------------------
DEFAULTS = configurator.settings(globals())  # only a run with these publishes its table (runs.is_default)
MiB = 2**20
GEN_TOKENS = 5  # generated per streamed frame, as in the paper's Table 1
MODEL = dict(n_layer=4, n_head=4, n_embd=128, n_vis_layer=2, n_vis_head=4, n_vis_embd=128)  # casa.Config()'s
# what the streaming picture shows: KV bytes in use and time to first token against the turn (the
# caches are reserved up front, so allocated memory is flat by design; the table has it)
STREAM_PANELS = (("kv_bytes", "KV cache in use (MiB)", 1 / MiB), ("ttft_ms", "time to first token (ms)", 1.0))


def draw_stream(records, path):
    """stream.py --bench's per-turn records -> KV cache and TTFT against the turn, a line per variant."""
    n_turns = len({r["turn"] for r in records})
    n_variants = len({r["variant"] for r in records})
    plots.line_panels(records, path, STREAM_PANELS, title=f"streaming (stream.py --bench): {n_variants} variants "
                      f"on one backbone, {n_turns} turns of one frame each")


def activation_bytes(model, idx, images, targets):
    """Bytes autograd saves for backward in one forward pass (each storage counted once; the
    parameters, which training holds anyway, left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, images, targets)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def train_speed(config, data, batch_size, steps, device, warmup=3):
    """(text tokens per second, activation bytes or CUDA peak bytes) for a few AdamW steps."""
    torch.manual_seed(0)
    model = casa.VLM(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    cuda = device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    tokens, seconds = 0, 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        idx, targets, images, _ = data.get_batch(batch_size, gen)
        idx, targets, images = idx.to(device), targets.to(device), images.to(device)
        stream.sync(device)
        t0 = time.perf_counter()
        with autocast:
            _, loss = model(idx, images, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stream.sync(device)
        if i >= warmup:
            seconds += time.perf_counter() - t0
            tokens += text_tokens(targets)
    if cuda:
        memory = torch.cuda.max_memory_allocated()
    else:
        memory = activation_bytes(model, idx, images, targets)
    return tokens / seconds, memory


def turn_seconds(record):
    """One streaming turn: frame + prefill to the first token, then the m one-token forwards that
    follow (stream.one_turn; decode_tok_s = m / their time)."""
    return record["ttft_ms"] / 1000 + GEN_TOKENS / record["decode_tok_s"]


def main(argv=None):
    configurator.apply(globals(), argv)
    if stream_json:
        if not png:
            sys.exit("error: --stream_json draws a picture: give its path too, --png=PATH")
        check_picture("png", png)
        try:
            with open(stream_json) as f:
                records = json.load(f)
        except (OSError, ValueError) as e:
            sys.exit(f"error: --stream_json={stream_json}: {e}")
        fields = {"variant", "turn", "kv_bytes", "ttft_ms"}
        if not isinstance(records, list) or not records or not all(isinstance(r, dict) and fields <= r.keys()
                                                                   for r in records):
            sys.exit(f"error: --stream_json={stream_json} holds no benchmark records: write them with "
                     "python stream.py --bench --json=PATH")
        draw_stream(records, png)
        print(f"wrote {png}")
        return
    check_settings(configurator.settings(globals()), train_steps=AT_LEAST_1, batch_size=AT_LEAST_1, turns=AT_LEAST_1,
                   threads=AT_LEAST_1,
                   patch_size=(lambda p: p in (2, 4, 8, 16, 32), "a power of 2 that divides the 32 px images: 2 to 32"))
    names = parse_names(variants, "variants", casa.VARIANTS)
    torch.set_num_threads(threads)
    try:
        dev = casa.pick_device(device)
        data = Dataset(resolve_dataset("shapes"), "train", 32)
    except (OSError, ValueError) as e:  # no such device; the shapes data missing and not made
        sys.exit(f"error: {e}")

    train = {}
    for v in names:
        config = casa.Config(variant=v, block_size=64, image_size=32, patch_size=patch_size, **MODEL)
        train[v] = train_speed(config, data, batch_size, train_steps, dev)
        print(f"train {v}: {train[v][0]:,.0f} text tok/s, {train[v][1] / MiB:.1f} MiB", flush=True)

    grid = 32 // patch_size
    records = stream.benchmark(log=lambda *a: None, turns=turns, image_tokens=grid * grid, gen_tokens=GEN_TOKENS,
                               variants=",".join(names), patch_size=patch_size, device=dev, text_only=False, **MODEL)
    by_variant = {}
    for r in records:
        by_variant.setdefault(r["variant"], []).append(r)

    rows, data_out = [], {}
    for v in names:
        recs = by_variant[v]
        tail = recs[-max(1, len(recs) // 10):]
        fps = 1 / statistics.mean(turn_seconds(r) for r in tail)
        fps_first = 1 / statistics.mean(turn_seconds(r) for r in recs[: max(1, len(recs) // 10)])
        last = recs[-1]
        tok_s, mem = train[v]
        data_out[v] = dict(train_tok_s=tok_s, train_memory_bytes=mem, stream_fps_first=fps_first, stream_fps_last=fps,
                           kv_bytes=last["kv_bytes"], kv_entries=last["cached_entries"])
        rows.append([v, f"{tok_s:,.0f}", f"{mem / MiB:.1f}", f"{fps_first:.0f} -> {fps:.0f}",
                     f"{last['kv_bytes'] / MiB:.2f}", f"{last['cached_entries']:,}", casa.kv_formula(casa.Config(variant=v))])
    mem_name = "peak allocated MiB" if dev.startswith("cuda") else "activation MiB"
    header = ["variant", "train text tok/s", f"train {mem_name}", f"stream frames/s (first -> last 10%)",
              f"KV MiB after {turns} frames", "KV entries", "#KV per layer"]
    text = (f"Efficiency on {dev} ({torch.get_num_threads()} thread(s)), model 4 x 128, {grid * grid} image "
            f"tokens per image; training: shapes, batch {batch_size}, {train_steps} timed steps; "
            f"streaming: {turns} frames, each followed by 5 generated tokens (stream.py --bench, fp32, "
            f"random weights); entries summed over layer kinds, per layer.\n\n" + markdown_table(header, rows))
    write_result("efficiency", text, data_out, published=is_default(configurator.settings(globals()), DEFAULTS))


if __name__ == "__main__":
    main()
