"""
How loud are the image tokens beside the text? For a trained checkpoint, and for the same model
at its initialisation, the root-mean-square of the image tokens and of the text tokens that enter
each block, on a batch of validation samples.

In insertion the image tokens travel in the residual stream with the text: the encoder's output
norm gives them an RMS of 1 while the text embeddings start near 0.02 (GPT-2's init), so a block's
update moves them relatively little. In the cross-attention designs they stay outside the stream
and every CA layer reads them through its own norm, so their scale does not matter there (they
are the same tensor in every block, except in ca_ffn, whose MLPs update them).

    python -m experiments.token_scale --ckpt=runs/accuracy-10000/charts/insertion-s1/ckpt.pt   # seconds
"""

import sys

import torch

import casa
import configurator
from data.loader import eval_batches
from experiments.runs import validation_split

# -----------------------------------------------------------------------------
ckpt = ""  # the trained checkpoint to measure (required)
samples = 64  # validation samples to draw from (the batch is their first group of equal length)
seed = 1  # seed of the freshly initialised model
# -----------------------------------------------------------------------------


def rms(t):
    return t.float().pow(2).mean().sqrt().item()


@torch.no_grad()
def token_scale(model, idx, images):
    """[(image RMS, text RMS)] of the tokens entering each block, for one forward pass."""
    seen = []

    def record(block, args):
        x, img, layout = args[:3]  # block(x, img, layout, cache); x (B, L, C)
        text = x[layout.valid & ~layout.is_image]  # padding left out
        # insertion: image tokens in the stream; the others: img (M, N, C) beside it
        seen.append((rms(x[layout.is_image] if img is None else img), rms(text)))

    hooks = [block.register_forward_pre_hook(record) for block in model.blocks]
    try:
        model(idx, images)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def main(argv=None):
    configurator.apply(globals(), argv)
    if not ckpt:
        sys.exit("error: --ckpt is required: the checkpoint to measure, e.g. --ckpt=out/ckpt.pt")
    if samples < 1 or seed < 0:
        sys.exit(f"error: --samples must be at least 1 and --seed 0 or more, got {samples} and {seed}")

    try:
        model, data = validation_split(ckpt)
    except (OSError, ValueError) as e:  # no such file, not a checkpoint, weights that do not fit, its dataset gone
        sys.exit(f"error: {e}")
    idx, images, _ = next(iter(eval_batches(data.eval_items()[:samples], samples)))
    torch.manual_seed(seed)
    fresh = casa.VLM(model.config).eval()
    print(f"{ckpt} ({model.config.variant}), {idx.size(0)} validation samples: RMS of the tokens entering each block")
    for name, m in (("trained", model), ("at init", fresh)):
        cells = [f"block {i}: image {a:.2f}, text {b:.2f} ({a / b:.0f}x)" for i, (a, b) in enumerate(token_scale(m, idx, images))]
        print(f"  {name:8s} " + " | ".join(cells))


if __name__ == "__main__":
    main()
