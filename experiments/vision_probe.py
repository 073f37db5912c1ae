"""
Can the vision encoder see what a question needs? Train casa's VisionEncoder alone (initialised as
in casa.VLM) with a linear classifier on its mean-pooled tokens, on the samples of one question
of a dataset, and report validation accuracy along the way. When this probe learns a question
that the VLMs do not, the limit is in how the language model learns to use the image, not in
what the encoder can resolve at this image size.

With --ckpt, the probe asks the same of a trained model: that checkpoint's encoder is frozen and only
a linear classifier on its tokens (all N of them, concatenated, so where a thing is stays readable)
is trained. When the probe reads an answer from the frozen tokens that the model itself gets wrong,
the information reached the fusion and the language model did not learn to read it.

    python -m experiments.vision_probe --dataset=charts --question=tallest     # ~1 min on one thread
    python -m experiments.vision_probe --dataset=shapes --question="what shape" --learning_rate=1e-3
    python -m experiments.vision_probe --ckpt=runs/video/insertion-s1/ckpt.pt --dataset=video \
        --question="what shape was in the first frame"

Samples with several images (video clips) are probed on their FIRST image, with the answer of the
turn whose prompt matches (the memory questions of data/video ask about the first frame).
"""

import math
import sys
import time

import torch
import torch.nn.functional as F

import casa
import configurator
from data.loader import load_image, read_split, resolve_dataset
from experiments.runs import AT_LEAST_0, AT_LEAST_1, check_settings
from stream import load_model

# -----------------------------------------------------------------------------
dataset = "charts"
question = "tallest"  # a piece of the prompt that selects the samples
steps = 500
batch_size = 32
learning_rate = 3e-3
image_size = 32
patch_size = 8
stem_norm = True  # the encoder's norm after its conv stem (casa.Config.stem_norm); False: the encoder before it
stem_he_init = False  # He's init for the stem's convs (casa.Config.stem_he_init); False: PyTorch's default
seed = 1
threads = 1
ckpt = ""  # probe this trained model's frozen encoder (its image size) instead
# -----------------------------------------------------------------------------


def load_question(folder, split, question, image_size):
    """Images (M, 3, S, S) and answers of the samples with a prompt containing `question`: one-image
    samples with their image, samples with several images (and turns) with their first image and the
    first matching turn's answer."""
    paths, answers = [], []
    for s in read_split(folder, split):  # checked: a bad line is a DataError naming its file, line and field
        match = next((answer for prompt, answer in s.turns if question in prompt), None)
        if match is not None and s.images:
            paths.append(s.images[0])
            answers.append(match)
    if not paths:
        sys.exit(f"error: no sample of {folder}/{split}.jsonl has an image and a prompt containing {question!r}")
    images = torch.stack([load_image(p, image_size) for p in paths])
    return images, answers


def main(argv=None):
    configurator.apply(globals(), argv)
    check_settings(configurator.settings(globals()), steps=AT_LEAST_1, batch_size=AT_LEAST_1, image_size=AT_LEAST_1,
                   seed=AT_LEAST_0, threads=AT_LEAST_1, learning_rate=(lambda lr: 0 < lr < math.inf, "more than 0"),
                   question=(bool, "a piece of the prompts to probe"))
    torch.set_num_threads(threads)
    try:
        folder = resolve_dataset(dataset)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    torch.manual_seed(seed)
    if ckpt:  # a trained encoder, frozen; the classifier reads all its tokens
        try:
            model, _ = load_model(ckpt, "cpu")
        except (OSError, ValueError) as e:  # no such file, not a checkpoint, weights that do not fit
            sys.exit(f"error: {e}")
        encoder, config = model.vision.requires_grad_(False).eval(), model.config
        size = config.image_size
        features = lambda images: encoder(images).flatten(1)  # (M, N*C)
        n_features = config.n_image_tokens * config.n_embd
    else:  # a fresh encoder, trained with the classifier on its mean-pooled tokens
        try:
            config = casa.Config(image_size=image_size, patch_size=patch_size, stem_norm=stem_norm,
                                 stem_he_init=stem_he_init)
        except ValueError as e:  # a patch size that does not tile the image
            sys.exit(f"error: --image_size/--patch_size: {e}")
        size = image_size
        encoder = casa.VLM(config).vision  # the VLM's initialisation
        features = lambda images: encoder(images).mean(1)  # (M, C)
        n_features = config.n_embd
    try:
        x, answers = load_question(folder, "train", question, size)
        xv, answers_v = load_question(folder, "val", question, size)
    except (OSError, ValueError) as e:  # a bad line, a missing or unreadable image
        sys.exit(f"error: {e}")
    classes = sorted(set(answers))
    y = torch.tensor([classes.index(a) for a in answers])
    yv = torch.tensor([classes.index(a) if a in classes else -1 for a in answers_v])
    majority = max((yv == c).float().mean().item() for c in range(len(classes)))

    head = torch.nn.Linear(n_features, len(classes))
    params = [p for p in [*encoder.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.99), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    print(f"{dataset}, prompts with {question!r}: {len(y)} train / {len(yv)} val samples, "
          f"{len(classes)} answers, majority answer {majority:.3f} of val; lr {learning_rate}"
          + (f"; frozen encoder of {ckpt}" if ckpt else ""))
    t0 = time.time()
    for step in range(1, steps + 1):
        i = torch.randint(0, len(y), (batch_size,), generator=gen)
        loss = F.cross_entropy(head(features(x[i])), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps:
            with torch.no_grad():
                acc = (head(features(xv)).argmax(-1) == yv).float().mean().item()
            print(f"step {step}: train loss {loss.item():.3f}, val accuracy {acc:.3f} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
