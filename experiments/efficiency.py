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

    python experiments/efficiency.py                 # ~2 min on one CPU thread
    python experiments/efficiency.py --patch_size=8 --turns=200   # the accuracy runs' 16 image tokens

Numbers go to docs/results/efficiency.md.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import casa  # noqa: E402
import stream  # noqa: E402
from data.loader import Dataset, resolve_dataset, text_tokens  # noqa: E402
from experiments.runs import is_default, markdown_table, write_result  # noqa: E402

MiB = 2**20
GEN_TOKENS = 5  # generated per streamed frame, as in the paper's Table 1


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
        idx, targets, images = data.get_batch(batch_size, gen)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(casa.VARIANTS))
    parser.add_argument("--patch_size", type=int, default=4, help="4: 64 image tokens (casa.Config()); 8: 16 (the accuracy runs)")
    parser.add_argument("--train_steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--turns", type=int, default=500, help="frames streamed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = casa.pick_device(args.device)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in casa.VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(casa.VARIANTS)}")
    model_args = dict(n_layer=4, n_head=4, n_embd=128, image_size=32, patch_size=args.patch_size,
                      n_vis_layer=2, n_vis_head=4, n_vis_embd=128)
    data = Dataset(resolve_dataset("shapes"), "train", 32)

    train = {}
    for v in variants:
        config = casa.Config(variant=v, block_size=64, **model_args)
        train[v] = train_speed(config, data, args.batch_size, args.train_steps, device)
        print(f"train {v}: {train[v][0]:,.0f} text tok/s, {train[v][1] / MiB:.1f} MiB", flush=True)

    grid = 32 // args.patch_size
    bench_args = stream.parse_args([
        "--bench", f"--turns={args.turns}", f"--image_tokens={grid * grid}", f"--gen_tokens={GEN_TOKENS}",
        f"--variants={','.join(variants)}", "--n_layer=4", "--n_head=4", "--n_embd=128",
        f"--patch_size={args.patch_size}", "--n_vis_layer=2", "--n_vis_head=4", "--n_vis_embd=128",
        f"--device={device}", "--text_only=False"])
    records = stream.run_bench(bench_args, log=lambda *a: None)
    by_variant = {}
    for r in records:
        by_variant.setdefault(r["variant"], []).append(r)

    rows, data_out = [], {}
    for v in variants:
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
    mem_name = "peak allocated MiB" if device.startswith("cuda") else "activation MiB"
    header = ["variant", "train text tok/s", f"train {mem_name}", f"stream frames/s (first -> last 10%)",
              f"KV MiB after {args.turns} frames", "KV entries", "#KV per layer"]
    text = (f"Efficiency on {device} ({torch.get_num_threads()} thread(s)), model 4 x 128, {grid * grid} image "
            f"tokens per image; training: shapes, batch {args.batch_size}, {args.train_steps} timed steps; "
            f"streaming: {args.turns} frames, each followed by 5 generated tokens (stream.py --bench, fp32, "
            f"random weights); entries summed over layer kinds, per layer.\n\n" + markdown_table(header, rows))
    write_result("efficiency", text, data_out, published=is_default(parser, args))


if __name__ == "__main__":
    main()
