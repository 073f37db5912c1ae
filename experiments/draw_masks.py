"""
Draw the attention patterns of insertion, cross-attention and CASA (ca_tv) from the masks the model
really builds (casa.make_layout), for a short sequence with text before the first image and two images.

    python -m experiments.draw_masks --out=docs/masks.png

Rows are queries, columns keys; a filled cell means "may attend". Text keys are blue, image keys
orange. Each panel is one kind of attention layer.
"""

import os

import torch

import casa
import configurator
from experiments import plots
from experiments.runs import check_picture

# -----------------------------------------------------------------------------
out = "docs/masks.png"  # the picture to write
# -----------------------------------------------------------------------------


def masks_for(variant, idx, n_images):
    """The masks one forward builds: a list of (title, mask (Tq, Tk) bool, key_is_image (Tk,),
    query labels, key labels)."""
    config = casa.Config(variant=variant, image_size=8, patch_size=4, n_layer=2, n_embd=32, n_head=2,
                         n_vis_embd=16, n_vis_head=2, n_vis_layer=1)
    model = casa.VLM(config)
    img = model.vision(torch.rand(n_images, 3, 8, 8))
    layout = casa.make_layout(config, idx, idx == model.image_id, img.size(1), cache=None)
    tok = casa.get_tokenizer()
    text_labels = ["I" if t == model.image_id else tok.decode([t]) for t in idx[0].tolist()]
    N = config.n_image_tokens
    if config.insert_images:  # one causal self-attention over the mixed stream
        is_img = layout.is_image[0]
        L = is_img.numel()
        labels, it = [], iter(text_labels)
        for i in range(L):
            labels.append("" if is_img[i] else next(it))
        mask = torch.ones(L, L, dtype=torch.bool).tril()
        return [("insertion: self-attention over text + image tokens", mask, is_img, labels, labels)]
    T = idx.size(1)
    sa = ("text self-attention (every variant)", torch.ones(T, T, dtype=torch.bool).tril(),
          torch.zeros(T, dtype=torch.bool), text_labels, text_labels)
    ca_mask = layout.ca_mask[0]  # (T, W*N [+ T])
    n_img_keys = layout.slot_win.size(1)
    key_is_image = torch.arange(ca_mask.size(1)) < n_img_keys
    key_labels = [f"y{j // N + 1}" if j % N == 0 else "" for j in range(n_img_keys)]
    title = "ca: cross-attention to the window's image"
    if config.ca_text_keys:
        key_labels += text_labels
        title = "ca_tv (CASA): window's image + window's text, one softmax"
    return [sa, (title, ca_mask, key_is_image, text_labels, key_labels)]


def main(argv=None):
    configurator.apply(globals(), argv)
    check_picture("out", out)
    tok = casa.get_tokenizer()
    ids = tok.encode("ab<|image|>cde<|image|>fg", allowed_special="all")
    idx = torch.tensor([ids])
    panels = []
    for variant in ["insertion", "ca", "ca_tv"]:
        panels += [plots.mask_panel(*p) for p in masks_for(variant, idx, n_images=2)]
    panels = [panels[0], panels[1], panels[2], panels[4]]  # SA panel once
    fig = plots.row_of(panels, "rows: queries; columns: keys; blue = text key, orange = image key "
                       "(y1, y2: first token of each image); I = <|image|> marker")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
