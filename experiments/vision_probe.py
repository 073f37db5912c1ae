"""
Can the vision encoder see what a question needs? Train casa's VisionEncoder alone (initialised as
in casa.VLM) with a linear classifier on its mean-pooled tokens, on the samples of one question
of a dataset, and report validation accuracy along the way. When this probe learns a question
that the VLMs do not, the limit is in how the language model learns to use the image, not in
what the encoder can resolve at this image size.

    python experiments/vision_probe.py --dataset=charts --question=tallest     # ~1 min on one thread
    python experiments/vision_probe.py --dataset=shapes --question="what shape" --learning_rate=1e-3
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import casa  # noqa: E402
from data.loader import resolve_dataset  # noqa: E402


def load_question(folder, split, question, image_size):
    """Images (M, 3, S, S) and answers of the one-image samples whose prompt contains `question`."""
    with open(os.path.join(folder, f"{split}.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if question in r.get("prompt", "")]
    if not rows:
        sys.exit(f"no sample of {folder}/{split}.jsonl has a prompt containing {question!r}")
    images = torch.stack([casa.load_image(os.path.join(folder, r["image"]), image_size) for r in rows])
    return images, [r["answer"] for r in rows]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="charts")
    p.add_argument("--question", default="tallest", help="a piece of the prompt that selects the samples")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--patch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    try:
        folder = resolve_dataset(args.dataset)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    x, answers = load_question(folder, "train", args.question, args.image_size)
    xv, answers_v = load_question(folder, "val", args.question, args.image_size)
    classes = sorted(set(answers))
    y = torch.tensor([classes.index(a) for a in answers])
    yv = torch.tensor([classes.index(a) if a in classes else -1 for a in answers_v])
    majority = max((yv == c).float().mean().item() for c in range(len(classes)))

    torch.manual_seed(args.seed)
    config = casa.Config(image_size=args.image_size, patch_size=args.patch_size)
    encoder = casa.VLM(config).vision  # the VLM's initialisation
    head = torch.nn.Linear(config.n_embd, len(classes))
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.99), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"{args.dataset}, prompts with {args.question!r}: {len(y)} train / {len(yv)} val samples, "
          f"{len(classes)} answers, majority answer {majority:.3f} of val; lr {args.learning_rate}")
    t0 = time.time()
    for step in range(1, args.steps + 1):
        i = torch.randint(0, len(y), (args.batch_size,), generator=gen)
        loss = F.cross_entropy(head(encoder(x[i]).mean(1)), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            with torch.no_grad():
                acc = (head(encoder(xv).mean(1)).argmax(-1) == yv).float().mean().item()
            print(f"step {step}: train loss {loss.item():.3f}, val accuracy {acc:.3f} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
