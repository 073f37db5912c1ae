"""
casa.py: a small vision-language model with every fusion design of the CASA paper, in one file.

"CASA: Cross-Attention over Self-Attention for Efficient Vision-Language Fusion", Boehle et al.
(Kyutai), arXiv 2512.19535. Three ways to let text see an image:

  insertion  the image's N tokens are placed in the text stream after their <|image|> marker: one
             causal self-attention over the mixed sequence, image tokens go through every layer and
             stay in the KV cache forever.
  ca         cross-attention (CA): text queries attend to the image's keys/values in a layer of their
             own, next to the text self-attention (SA). Image tokens never enter the stream or the
             text KV cache; only the current image's K/V is cached.
  ca_tv      "CASA" / CA^{t+v}: the CA layer's keys are the image AND the text of the current window,
             in one softmax: the self-attention of insertion, restricted to a local window.

plus the paper's ladder from CA to insertion (D1-D4), each one switch in VARIANTS below.

Reading order: tokenizer, building blocks (norm, RoPE, attention, MLP), vision encoder, the
transformer block, config, the model, its KV cache, generation, analysis helpers.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Tokenizer: 256 byte tokens plus a few special tokens. Works offline (no BPE files to download).

ENDOFTEXT = "<|endoftext|>"  # ends an answer; generation stops on it
IMAGE = "<|image|>"  # the image marker: binds one image; first token (the gist) of its window
ANSWER = "<|answer|>"  # separates a prompt from its answer
SPECIAL_TOKENS = [ENDOFTEXT, IMAGE, ANSWER]


def get_tokenizer():
    """The project's tokenizer, a tiktoken.Encoding: 256 byte tokens + the special tokens, ids 256,
    257, 258. Needs no download. (A BPE vocabulary such as GPT-2's 50k tokens would make the
    embedding of these 128-wide toy models several times larger than the rest of the model, and
    needs files from the internet; bytes keep every part of the project offline.)"""
    import tiktoken

    ranks = {bytes([i]): i for i in range(256)}
    special = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
    # one byte per token: the pattern splits the text into single characters, the byte-level
    # encoding of each is then its UTF-8 bytes
    return tiktoken.Encoding(name="casa-bytes", pat_str=r"(?s:.)", mergeable_ranks=ranks, special_tokens=special)


# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """RMS norm with a learned scale (no bias), as in most recent LLMs."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, eps=1e-6)


def rope(x, pos, inv_freq):
    """Rotary position embedding. x (B, H, T, D), pos (B, T) integer positions, inv_freq (D/2,).
    Computed from the positions on the fly, so a streaming cache can run past block_size."""
    angles = pos[:, None, :, None].to(inv_freq.dtype) * inv_freq  # (B, 1, T, D/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def attend(q, k, v, mask):
    """Scaled dot-product attention. q (B, H, Tq, D); k, v (B, H, Tk, D).
    mask: (B, Tq, Tk) bool, True where a query may see a key; None means plain causal.
    A query that may see no key at all (text before the first image, in a CA layer) gets 0."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    empty = ~mask.any(dim=-1)  # (B, Tq)
    if empty.any():
        # give empty rows one harmless key so softmax stays finite (in the forward and the
        # backward), then zero their output
        mask = mask.clone()
        mask[..., 0] |= empty
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    return y.masked_fill(empty[:, None, :, None], 0.0)


class Attention(nn.Module):
    """Projections of one attention layer: q, k, v from the input, o back to the residual stream.
    The attention itself (which keys, which mask) is decided by the Block, because that is where
    self-attention, cross-attention and their mixes differ."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.kv = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)
        self.o = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # record attention probabilities (for attention_mass); None = off
        self.record = None

    def heads(self, x):  # (B, T, C) -> (B, H, T, D)
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def project_q(self, x):
        return self.heads(self.q(x))

    def project_kv(self, x):
        k, v = self.kv(x).chunk(2, dim=-1)
        return self.heads(k), self.heads(v)

    def attend(self, q, k, v, mask, key_is_image=None):
        """Like attend(); when recording, the same result by an explicit softmax, kept for analysis."""
        if self.record is None:
            return attend(q, k, v, mask)
        Tq, Tk = q.size(2), k.size(2)
        if mask is None:
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()[None]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        probs = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
        self.record.append((probs.detach(), mask, key_is_image))
        return probs @ v

    def merge(self, y):  # (B, H, T, D) -> (B, T, C) through the output projection
        B, H, T, D = y.shape
        return self.o(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, n_embd, bias=False, dropout=0.0):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


# -----------------------------------------------------------------------------
# Vision encoder: images (M, 3, H, W) in [0, 1] -> image tokens (M, N, n_embd)


class VisionBlock(nn.Module):
    """Pre-norm transformer block with bidirectional attention over one image's patches."""

    def __init__(self, dim, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_attn = RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.ln_mlp = RMSNorm(dim)
        self.mlp = MLP(dim)

    def forward(self, x):  # (M, N, C)
        M, N, C = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).view(M, N, 3, self.n_head, C // self.n_head).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.o(y.transpose(1, 2).reshape(M, N, C))
        return x + self.mlp(self.ln_mlp(x))


class VisionEncoder(nn.Module):
    """A convolutional stem, learned 2D (row + column) position embeddings, a few bidirectional
    blocks, projection to the text width. The output is normalised so every fusion design gets
    image tokens on the same scale as text.

    The stem is log2(patch_size) stages of (3x3 conv, GELU, 2x2 max-pool), each halving the
    resolution, so each token sums up one patch_size x patch_size patch and its surroundings.
    Early convolutions (Xiao et al. 2021) train small ViTs far faster than a plain patchify conv,
    and the max-pools give the tokens some invariance to where exactly an edge lies: trained alone
    on the shapes task's shape question, the encoder reaches 1.00 in 600 steps with this stem,
    0.54 with stride-2 convolutions and no pooling (docs/recipe.md)."""

    def __init__(self, config):
        super().__init__()
        self.image_size = config.image_size
        grid = config.image_size // config.patch_size
        vd = config.n_vis_embd
        n = config.patch_size.bit_length() - 1  # stages: patch_size = 2^n
        widths = [max(vd >> (n - 1 - i), 1) for i in range(n)]  # doubling up to vd: 32, 64, 128
        layers = []
        for c_in, c_out in zip([3] + widths, widths):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.GELU(), nn.MaxPool2d(2)]
        self.stem = nn.Sequential(*layers)  # (M, 3, S, S) -> (M, vd, grid, grid)
        self.row_emb = nn.Parameter(torch.zeros(grid, 1, vd))
        self.col_emb = nn.Parameter(torch.zeros(1, grid, vd))
        self.blocks = nn.ModuleList(VisionBlock(vd, config.n_vis_head) for _ in range(config.n_vis_layer))
        self.ln_f = RMSNorm(vd)
        self.proj = nn.Linear(vd, config.n_embd, bias=False)
        self.ln_out = RMSNorm(config.n_embd)

    def forward(self, images):  # (M, 3, H, W) in [0, 1]
        x = self.stem(images * 2 - 1).permute(0, 2, 3, 1)  # (M, grid, grid, vd)
        x = x + self.row_emb + self.col_emb
        x = x.flatten(1, 2)  # (M, N, vd), patches row by row
        for block in self.blocks:
            x = block(x)
        return self.ln_out(self.proj(self.ln_f(x)))  # (M, N, n_embd)


# -----------------------------------------------------------------------------
# The transformer block: text self-attention, cross-attention, or both, then the MLP.


class Block(nn.Module):
    """One pre-norm block of the text transformer.

        SA only   (insertion; even layers of ca_replace):   x += SA(ln_sa(x))
        SA + CA   (ca, ca_tv, ca_ffn):                       x += SA(ln_sa(x)) + CA(ln_ca(x))
        SA + CA, shared projections (ca_shared):            x += o(attn_sa(q, k, v) + attn_ca(q, k_img, v_img))
        CA only   (odd layers of ca_replace):                x += CA(ln_ca(x))
    then x += MLP(ln_mlp(x)). With ca_ffn the image tokens also take x += MLP(ln_mlp(x)) here.
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        self.has_sa = not (config.ca_replaces_sa and layer_idx % 2 == 1)
        self.has_ca = not config.insert_images and (not config.ca_replaces_sa or layer_idx % 2 == 1)
        self.ca_text_keys = config.ca_text_keys
        self.ca_image_ffn = config.ca_image_ffn
        self.shared = config.ca_shared
        if self.has_sa:
            self.ln_sa = RMSNorm(config.n_embd)
            self.sa = Attention(config)
        if self.has_ca and not self.shared:
            self.ln_ca = RMSNorm(config.n_embd)
            self.ca = Attention(config)
        self.ln_mlp = RMSNorm(config.n_embd)
        self.mlp = MLP(config.n_embd, config.bias, config.dropout)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def init_ca_from_sa(self):
        """The paper initialises CA projections from the same block's SA weights."""
        if self.has_sa and self.has_ca and not self.shared:
            self.ca.load_state_dict(self.sa.state_dict())

    def ca_modules(self):  # (norm, projections) used by the CA branch
        return (self.ln_sa, self.sa) if self.shared else (self.ln_ca, self.ca)

    def forward(self, x, step, layer_cache=None):
        """x (B, T, C) text (or, for insertion, the mixed stream); step: the Step of this forward;
        layer_cache: this layer's slice of the Cache, or None."""
        out = 0
        if self.has_sa:
            h = self.ln_sa(x)
            q_raw = self.sa.project_q(h)
            k, v = self.sa.project_kv(h)
            q, k = rope(q_raw, step.pos, self.inv_freq), rope(k, step.pos, self.inv_freq)
            if layer_cache is not None:  # write the new K/V into the cache, attend over all of it
                k, v = layer_cache.sa.write(k, v)
            y = self.sa.attend(q, k, v, step.sa_mask, step.sa_key_is_image)
            if self.shared and step.run_ca:  # D1: CA reuses q (unrotated: no positions in CA),
                y = y + self.cross_attend(x, step, layer_cache, q=q_raw)  # the k/v weights and o
            out = self.sa.merge(y)
        if self.has_ca and not self.shared and step.run_ca:
            out = out + self.ca.merge(self.cross_attend(x, step, layer_cache))
        x = x + out
        x = x + self.mlp(self.ln_mlp(x))
        if self.ca_image_ffn and step.img is not None:  # D4: image tokens updated by the FFN too
            step.img = step.img + self.mlp(self.ln_mlp(step.img))
        return x

    def cross_attend(self, x, step, layer_cache, q=None):
        """Text queries attend to their window's image (and, for ca_tv, the window's text).
        Returns (B, H, T, D) before the output projection."""
        ln, attn = self.ca_modules()
        h = ln(x)
        if q is None:
            q = attn.project_q(h)
            if self.ca_text_keys:  # D2: positions inside the layer, relative to the image
                q = rope(q, step.pos, self.inv_freq)
        # keys/values of the images in this forward (M, H, N, D), rotated to their marker's position
        k_new = v_new = None
        if step.img is not None:
            k_new, v_new = attn.project_kv(ln(step.img))
            if self.ca_text_keys:
                k_new = rope(k_new, step.img_pos[:, None].expand(-1, k_new.size(2)), self.inv_freq)
        k, v = step.image_bank(k_new, v_new, layer_cache)  # (B, H, Wb*N, D), one slot per window
        mask, key_is_image = step.ca_mask, None
        if self.ca_text_keys:  # window text joins the keys, in the same softmax
            kt, vt = attn.project_kv(h)
            kt = rope(kt, step.pos, self.inv_freq)
            if layer_cache is not None:
                kt, vt = layer_cache.ca_text.write(kt, vt)
            n_img = 0 if k is None else k.size(2)
            key_is_image = torch.arange(n_img + kt.size(2), device=x.device) < n_img
            if k is not None:
                kt, vt = torch.cat([k, kt], dim=2), torch.cat([v, vt], dim=2)
            k, v = kt, vt
        return attn.attend(q, k, v, mask, key_is_image)


def rope_inv_freq(config):
    head_dim = config.n_embd // config.n_head
    return 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))


# -----------------------------------------------------------------------------
# Config: the fusion variants, each a set of switches. Reading a row left to right moves CA toward
# insertion; turning every switch on (and seeing all past images, D5) is insertion.

VARIANTS = {
    #              image tokens   D1: CA reuses   D2: window text   D3: CA replaces   D4: image tokens   D5: CA sees every
    #              in the stream  SA projections  in the CA keys    every 2nd SA      through the FFNs   past image
    "ca":         dict(insert_images=False, ca_shared=False, ca_text_keys=False, ca_replaces_sa=False, ca_image_ffn=False, ca_all_images=False),
    "ca_shared":  dict(insert_images=False, ca_shared=True,  ca_text_keys=False, ca_replaces_sa=False, ca_image_ffn=False, ca_all_images=False),
    "ca_tv":      dict(insert_images=False, ca_shared=False, ca_text_keys=True,  ca_replaces_sa=False, ca_image_ffn=False, ca_all_images=False),
    "ca_replace": dict(insert_images=False, ca_shared=False, ca_text_keys=False, ca_replaces_sa=True,  ca_image_ffn=False, ca_all_images=False),
    "ca_ffn":     dict(insert_images=False, ca_shared=False, ca_text_keys=False, ca_replaces_sa=False, ca_image_ffn=True,  ca_all_images=False),
    "ca_all":     dict(insert_images=False, ca_shared=False, ca_text_keys=False, ca_replaces_sa=False, ca_image_ffn=False, ca_all_images=True),
    "insertion":  dict(insert_images=True,  ca_shared=False, ca_text_keys=False, ca_replaces_sa=False, ca_image_ffn=False, ca_all_images=True),
}  # fmt: skip


@dataclass
class Config:
    # text transformer (nanoGPT's names)
    block_size: int = 256  # longest text (in tokens) one forward call takes
    vocab_size: int = 259  # 256 bytes + 3 special tokens (get_tokenizer().n_vocab)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    rope_theta: float = 10000.0
    # vision encoder
    image_size: int = 32  # images are (3, image_size, image_size)
    patch_size: int = 4  # -> (image_size / patch_size)^2 image tokens per image
    n_vis_layer: int = 2
    n_vis_head: int = 4
    n_vis_embd: int = 128
    # fusion: one of VARIANTS
    variant: str = "ca"

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd ({self.n_embd}) must split into n_head ({self.n_head}) heads of even size")
        if self.patch_size < 2 or self.patch_size & (self.patch_size - 1):
            raise ValueError(f"patch_size ({self.patch_size}) must be a power of 2 (2, 4, 8, 16): the vision "
                             "stem halves the resolution log2(patch_size) times")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.n_vis_embd % self.n_vis_head:
            raise ValueError(f"n_vis_embd ({self.n_vis_embd}) must be a multiple of n_vis_head ({self.n_vis_head})")

    # the variant's switches, read from VARIANTS
    insert_images = property(lambda self: VARIANTS[self.variant]["insert_images"])
    ca_shared = property(lambda self: VARIANTS[self.variant]["ca_shared"])
    ca_text_keys = property(lambda self: VARIANTS[self.variant]["ca_text_keys"])
    ca_replaces_sa = property(lambda self: VARIANTS[self.variant]["ca_replaces_sa"])
    ca_image_ffn = property(lambda self: VARIANTS[self.variant]["ca_image_ffn"])
    ca_all_images = property(lambda self: VARIANTS[self.variant]["ca_all_images"])

    @property
    def n_image_tokens(self):
        return (self.image_size // self.patch_size) ** 2

    def layer_kinds(self):
        """(has_sa, has_ca) for each layer."""
        kinds = []
        for i in range(self.n_layer):
            has_sa = not (self.ca_replaces_sa and i % 2 == 1)
            has_ca = not self.insert_images and (not self.ca_replaces_sa or i % 2 == 1)
            kinds.append((has_sa, has_ca))
        return kinds


# -----------------------------------------------------------------------------
# The model


class Step:
    """Everything the blocks share about one forward call, computed once, vectorised: positions,
    masks, which image each window has. Windows: window w of a row starts at its w-th <|image|>
    marker and runs to the next one; window 0 is the text before the first image (no image).

    Shapes: T new tokens per row (for insertion, T = length of the mixed stream), M new images,
    N tokens per image, S tokens already in the cache."""

    def __init__(self, model, idx, img, cache):
        config, device = model.config, idx.device
        B, T_text = idx.shape
        is_marker = idx == model.image_id  # (B, T)
        self.img = img  # (M, N, C) new image tokens (updated per layer by ca_ffn), or None
        self.has_images = img is not None or (cache is not None and cache.ca_image.length > 0)
        # whether the CA branch runs: with no image anywhere its output is 0 and it is skipped,
        # except for ca_tv, whose CA layer also attends to the window's text
        self.run_ca = self.has_images or config.ca_text_keys
        self.sa_key_is_image = None

        # positions: text positions for CA variants; for insertion, positions in the mixed stream
        start = cache.next_pos if cache is not None else torch.zeros(B, dtype=torch.long, device=device)
        if config.insert_images:
            self.build_stream(is_marker, start, cache, img is not None and img.size(1) or 0)
            return
        self.pos = start[:, None] + torch.arange(T_text, device=device)  # (B, T)
        self.text_idx, self.valid = None, None
        self.sa_mask = None if cache is None else cache.sa.mask(self.pos, None)

        # windows (global per row: counting continues across calls through the cache)
        w0 = cache.window if cache is not None else torch.zeros(B, dtype=torch.long, device=device)
        self.win = w0[:, None] + is_marker.cumsum(dim=1)  # (B, T)
        self.last_win = self.win[:, -1]
        # image bank: the new images in reading order, one slot of N tokens per window of the row.
        # bank_src[b, j] = index into the M new images, or -1 (the row has fewer new images).
        n_new = is_marker.sum(dim=1)  # (B,)
        W = int(n_new.max()) if B > 0 else 0
        offsets = n_new.cumsum(0) - n_new  # first image index of each row
        j = torch.arange(W, device=device)
        self.bank_src = torch.where(j < n_new[:, None], offsets[:, None] + j, -1)  # (B, W)
        N = config.n_image_tokens
        self.bank_win = (w0[:, None] + 1 + j).repeat_interleave(N, dim=1)  # (B, W*N) window of each key
        self.bank_ok = (self.bank_src >= 0).repeat_interleave(N, dim=1)  # (B, W*N)
        key_win, key_ok = self.bank_win, self.bank_ok
        if cache is not None:  # images cached by earlier calls come first; their pos is their window
            key_win = torch.cat([cache.ca_image.pos[:, : cache.ca_image.length], key_win], dim=1)
            key_ok = torch.cat([cache.ca_image.valid[:, : cache.ca_image.length], key_ok], dim=1)
        # (B, T, keys): a query sees its own window's image; with D5, every image so far
        q_win = self.win[:, :, None]
        see = (key_win[:, None, :] <= q_win) if config.ca_all_images else (key_win[:, None, :] == q_win)
        self.ca_mask = see & key_ok[:, None, :]
        self.img_pos = self.pos[is_marker] if img is not None else None  # (M,) marker positions
        if config.ca_text_keys:  # the window's text, causal; cached window text is window w0's
            new_text = (self.win[:, :, None] == self.win[:, None, :]) & torch.ones(
                T_text, T_text, dtype=torch.bool, device=device).tril()
            parts = [self.ca_mask, new_text]
            if cache is not None:
                parts.insert(1, cache.ca_text.mask_window(self.win == w0[:, None]))
            self.ca_mask = torch.cat(parts, dim=2)
        self.is_marker = is_marker

    def build_stream(self, is_marker, start, cache, N):
        """Insertion: lay out each row's stream (text with N image tokens after each marker), padded
        to the longest row. text_idx (B, T_text): where each text token sits in the stream."""
        B, T_text = is_marker.shape
        device = is_marker.device
        width = 1 + N * is_marker.long()  # stream slots each text token opens
        self.text_idx = width.cumsum(1) - width  # (B, T_text)
        lengths = width.sum(1)  # (B,)
        L = int(lengths.max())
        self.valid = torch.arange(L, device=device)[None] < lengths[:, None]  # (B, L): False = padding
        self.pos = start[:, None] + torch.arange(L, device=device)
        is_image = torch.ones(B, L, dtype=torch.bool, device=device)
        is_image.scatter_(1, self.text_idx, False)
        self.is_image = is_image & self.valid  # (B, L)
        self.is_marker, self.img_pos, self.win = is_marker, None, None
        if cache is not None:
            self.sa_mask = cache.sa.mask(self.pos, self.valid)
            self.sa_key_is_image = torch.cat([cache.sa_is_image[:, : cache.sa.length], self.is_image], dim=1)
        elif not bool(self.valid.all()):
            causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
            self.sa_mask = causal[None] & self.valid[:, None, :]
            self.sa_key_is_image = self.is_image
        else:
            self.sa_mask, self.sa_key_is_image = None, self.is_image

    def image_bank(self, k_new, v_new, layer_cache):
        """Image keys/values a CA layer attends to, (B, H, keys, D): images cached by earlier calls,
        then this call's new images, one slot of N tokens per window. None if there are none."""
        bank_k = bank_v = None
        if k_new is not None and self.bank_src.size(1) > 0:
            src = self.bank_src.clamp(min=0)  # (B, W); unused slots are masked out
            B, W = src.shape
            M, H, N, D = k_new.shape
            bank_k = k_new[src].permute(0, 2, 1, 3, 4).reshape(B, H, W * N, D)
            bank_v = v_new[src].permute(0, 2, 1, 3, 4).reshape(B, H, W * N, D)
        if layer_cache is None:
            return bank_k, bank_v
        store = layer_cache.ca_image
        if bank_k is None:  # nothing new: what is cached (if anything)
            return store.read() if store.length else (None, None)
        return store.write(bank_k, bank_v)


class VLM(nn.Module):
    """The vision-language model. One calling convention for every variant:

        logits, loss = model(idx, images=None, targets=None, cache=None)

    idx (B, T) token ids with <|image|> markers; images (M, 3, H, W) floats in [0, 1], bound to the
    markers in reading order (row 0's markers first, left to right, then row 1, ...). logits are
    (B, T, vocab) at the text positions for every variant. targets (B, T), -1 where no loss.
    With cache=model.new_cache(B), the call appends idx (and its images) to the cache and returns
    logits for the new positions only.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.image_id = get_tokenizer().encode(IMAGE, allowed_special="all")[0]
        self.vision = VisionEncoder(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        # the text side as in GPT-2 (std 0.02, residual projections scaled down). The vision encoder
        # keeps PyTorch's default init (about 1/sqrt(fan_in)): trained from scratch, it learns
        # several times faster with it than at std 0.02 (experiments/vision_probe.py)
        for module in (self.wte, self.blocks):
            module.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of the residual projections (GPT-2)
            if name.endswith(("o.weight", "proj.weight")) and "vision" not in name:
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        for block in self.blocks:
            block.init_ca_from_sa()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx, images=None, targets=None, cache=None):
        config = self.config
        img = self.encode_images(idx, images)  # (M, N, C) or None
        if cache is not None and cache.batch_size != idx.size(0):
            raise ValueError(f"the cache was made for batch size {cache.batch_size}, idx has {idx.size(0)} rows")
        step = Step(self, idx, img, cache)
        if cache is not None:
            cache.begin(step)
        x = self.wte(idx)  # (B, T, C)
        if config.insert_images:  # lay text and image tokens out in one stream
            B, L = step.pos.shape
            stream = x.new_zeros(B, L, x.size(-1))
            stream.scatter_(1, step.text_idx[..., None].expand_as(x), x)
            if img is not None:
                stream[step.is_image] = img.reshape(-1, img.size(-1)).to(stream.dtype)
            x = stream
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, step, cache.layers[i] if cache is not None else None)
        if config.insert_images:  # back to the text positions
            x = x.gather(1, step.text_idx[..., None].expand(-1, -1, x.size(-1)))
        if cache is not None:
            cache.commit(step)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def encode_images(self, idx, images):
        """Check idx and images against each other and the config; run the vision encoder."""
        config = self.config
        if idx.dim() != 2:
            raise ValueError(f"idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
        if idx.size(1) > config.block_size:
            raise ValueError(f"input of {idx.size(1)} tokens is longer than the context (block_size="
                             f"{config.block_size}); shorten the prompt or train with a larger block_size")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {config.vocab_size}); got {int(idx.min())}..{int(idx.max())}")
        if images is not None and images.dim() != 4:  # before counting: size(0) of one (3, S, S) image is 3
            S = config.image_size
            raise ValueError(f"images must be (M, 3, {S}, {S}) RGB (config.image_size={S}); got shape "
                             f"{tuple(images.shape)}. Stack them into one batch (one image: images[None])")
        n_markers = int((idx == self.image_id).sum())
        n_images = 0 if images is None else images.size(0)
        if n_markers != n_images:
            raise ValueError(f"{n_markers} <|image|> markers in idx but {n_images} images given; "
                             "pass exactly one image per marker, in reading order")
        if images is None or n_images == 0:
            return None
        S = config.image_size
        if images.dim() != 4 or images.size(1) != 3 or images.shape[-2:] != (S, S):
            raise ValueError(f"images must be (M, 3, {S}, {S}) RGB (config.image_size={S}); got shape "
                             f"{tuple(images.shape)}. Convert to RGB and resize to {S}x{S} first")
        if not images.is_floating_point():
            raise ValueError(f"images must be floats in [0, 1], got dtype {images.dtype}; divide uint8 pixels by 255")
        if float(images.min()) < 0 or float(images.max()) > 1:
            raise ValueError(f"image values must lie in [0, 1], got {float(images.min()):.3g}..{float(images.max()):.3g}")
        return self.vision(images)

    def copy_weights_from(self, state_dict):
        """Adaptation (train.py --init_from): start from another checkpoint's weights. Copies every
        tensor whose name and shape exist in both models (the vision encoder and the text
        transformer); CA layers that are new start from the same block's self-attention, as in the
        paper, or, where CA replaced the layer's SA (ca_replace), from the source's SA of that layer.
        Returns the names of the parameters copied from state_dict."""
        own = self.state_dict()
        copied = set()
        with torch.no_grad():
            for name, t in state_dict.items():
                if name in own and own[name].shape == t.shape:
                    own[name].copy_(t)
                    copied.add(name)
            for i, block in enumerate(self.blocks):
                if not block.has_ca or block.shared or f"blocks.{i}.ca.q.weight" in copied:
                    continue  # no CA projections of its own, or the source had them already
                if block.has_sa:
                    block.init_ca_from_sa()
                else:
                    for key, t in block.ca.state_dict().items():
                        if f"blocks.{i}.sa.{key}" in state_dict:
                            t.copy_(state_dict[f"blocks.{i}.sa.{key}"])
        return {n for n, _ in self.named_parameters() if n in copied}

    def new_cache(self, batch_size):
        return Cache(self, batch_size)

    @torch.no_grad()
    def generate(self, idx, images=None, max_new_tokens=32, temperature=1.0, top_k=None, stop_token=None,
                 cache=None):
        """Sample up to max_new_tokens after idx (B, T); returns (B, T + new). temperature=0 is greedy.
        Every returned token is in the cache afterwards, so calling again with the same cache (and a
        new image) continues the conversation: that is streaming. Rows that emitted stop_token are
        padded with it until every row has stopped."""
        if cache is None:
            cache = self.new_cache(idx.size(0))
        logits, _ = self(idx, images, cache=cache)
        out = [idx]
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            last = logits[:, -1, :].clone()
            last[:, self.image_id] = float("-inf")  # images come from the caller, never sampled
            next_id = sample(last, temperature, top_k)  # (B, 1)
            if stop_token is not None:
                next_id = torch.where(done[:, None], stop_token, next_id)
                done |= next_id[:, 0] == stop_token
            out.append(next_id)
            logits, _ = self(next_id, cache=cache)
            if stop_token is not None and bool(done.all()):
                break
        return torch.cat(out, dim=1)


def sample(logits, temperature=1.0, top_k=None):
    """logits (B, V) -> token ids (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)


# -----------------------------------------------------------------------------
# The KV cache


class KVStore:
    """Keys/values of one kind of attention for all layers of that kind, growing along time.

    k, v: (n_layers, B, H, capacity, D), filled up to `length`; pos, valid: (B, capacity).
    Capacity doubles when full, so appending one token is O(1) amortised, never a full copy.
    `valid` marks slots in use (False: padding of a shorter row, or text of a window that ended);
    compact() moves valid slots to the front when some were dropped."""

    def __init__(self, n_layers, batch_size, n_head, head_dim, device):
        self.shape = (n_layers, batch_size, n_head, head_dim)
        self.device = device
        self.k = self.v = None
        self.pos = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        self.length = 0  # slots used
        self.n_new = 0  # slots being written by the current forward

    def begin(self, n):
        """A forward is about to write n new slots, layer by layer."""
        self.n_new, self.layer = n, 0

    def reserve(self, n, dtype):
        """Make room for n more slots; doubles the capacity when full."""
        L, B, H, D = self.shape
        need = self.length + n
        cap = 0 if self.k is None else self.k.size(3)
        if self.k is None or self.k.dtype != dtype or need > cap:
            new_cap = max(need, 2 * cap, 16)
            # empty, not zeros: only the filled part is ever read
            k = torch.empty(L, B, H, new_cap, D, dtype=dtype, device=self.device)
            v = torch.empty_like(k)
            if self.k is not None:
                k[:, :, :, : self.length] = self.k[:, :, :, : self.length]
                v[:, :, :, : self.length] = self.v[:, :, :, : self.length]
            self.k, self.v = k, v

    def write(self, k, v):
        """Called by each layer in turn: k, v (B, H, n, D) -> all keys/values (B, H, length + n, D)."""
        i, end = self.layer, self.length + self.n_new
        if i == 0:
            self.reserve(self.n_new, k.dtype)
        self.k[i, :, :, self.length : end] = k
        self.v[i, :, :, self.length : end] = v
        self.layer += 1
        return self.k[i, :, :, :end], self.v[i, :, :, :end]

    def read(self):
        """For a layer with nothing new to write: its keys/values (B, H, length, D)."""
        i = self.layer
        self.layer += 1
        return self.k[i, :, :, : self.length], self.v[i, :, :, : self.length]

    def mask(self, pos, valid):
        """Self-attention mask (B, T, length + T) for new queries at positions pos (B, T):
        cached valid slots, and the new tokens causally (valid ones only)."""
        B, T = pos.shape
        old = self.valid[:, None, : self.length].expand(B, T, self.length)
        new = torch.ones(T, T, dtype=torch.bool, device=pos.device).tril()[None].expand(B, T, T)
        if valid is not None:
            new = new & valid[:, None, :]
        return torch.cat([old, new], dim=2)

    def mask_window(self, same_window):
        """ca_tv: cached window text (B, T, length) is visible to new queries still in its window."""
        return same_window[:, :, None] & self.valid[:, None, : self.length]

    def commit(self, pos, valid):
        """After all layers wrote: record the new slots' positions and validity."""
        n = self.n_new
        if self.pos.size(1) < self.length + n:
            grow = self.k.size(3) - self.pos.size(1)
            self.pos = torch.cat([self.pos, self.pos.new_zeros(self.pos.size(0), grow)], dim=1)
            self.valid = torch.cat([self.valid, self.valid.new_zeros(self.valid.size(0), grow)], dim=1)
        self.pos[:, self.length : self.length + n] = pos
        self.valid[:, self.length : self.length + n] = valid
        self.length += n
        self.n_new = 0

    def drop(self, keep):
        """Mark slots not in keep (B, length) as unused, then compact."""
        self.valid[:, : self.length] &= keep
        self.compact()

    def compact(self, extra=None):
        """Move each row's valid slots to the front (in order) and shrink length to the longest row.
        extra: other (B, capacity) tensors to reorder the same way."""
        valid = self.valid[:, : self.length]
        if bool(valid.all()):
            return extra
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # valid first
        L, B, H, D = self.shape
        idx = order[None, :, None, :, None].expand(L, B, H, -1, D)
        self.k[:, :, :, : self.length] = self.k[:, :, :, : self.length].gather(3, idx)
        self.v[:, :, :, : self.length] = self.v[:, :, :, : self.length].gather(3, idx)
        self.pos[:, : self.length] = self.pos[:, : self.length].gather(1, order)
        self.valid[:, : self.length] = valid.gather(1, order)
        if extra is not None:
            extra[:, : self.length] = extra[:, : self.length].gather(1, order)
        self.length = int(valid.sum(1).max())
        return extra

    def entries(self):
        """Cached (valid) entries per layer, summed over the batch."""
        return int(self.valid[:, : self.length].sum())

    def nbytes(self):
        """Bytes of keys and values in use, all layers."""
        if self.k is None:
            return 0
        L, B, H, D = self.shape
        return self.entries() * L * H * D * 2 * self.k.element_size()


class LayerCache:
    """One layer's view of the cache: its SA store, its CA image store, its ca_tv text store."""

    def __init__(self, sa, ca_image, ca_text):
        self.sa, self.ca_image, self.ca_text = sa, ca_image, ca_text


class Cache:
    """KV cache for streaming. What each variant keeps (k turns of T text tokens, N image tokens):

        insertion   SA layers: every text and image token              kT + kN per layer
        ca, ...     SA layers: text only; CA layers: the current image  kT + N
        ca_tv       as ca, plus the current window's text in CA layers  kT + (T + N)
        ca_replace  SA layers (half): text; CA layers (half): image     kT or N
        ca_all      SA layers: text only; CA layers: every image so far kT + kN

    Image K/V are computed once, when the image arrives. Use model.new_cache(batch_size)."""

    def __init__(self, model, batch_size):
        config = model.config
        device = model.lm_head.weight.device
        H, D = config.n_head, config.n_embd // config.n_head
        kinds = config.layer_kinds()
        n_sa, n_ca = sum(s for s, _ in kinds), sum(c for _, c in kinds)
        self.config, self.batch_size = config, batch_size
        self.sa = KVStore(n_sa, batch_size, H, D, device)
        # CA image K/V; an entry's pos is its window. Without D5 only the current window's is kept.
        self.ca_image = KVStore(n_ca, batch_size, H, D, device)
        self.ca_text = KVStore(n_ca, batch_size, H, D, device) if config.ca_text_keys else None
        self.layers = [LayerCache(self.sa if s else None, self.ca_image if c else None,
                                  self.ca_text if c else None) for s, c in kinds]
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # next stream position
        self.window = torch.zeros(batch_size, dtype=torch.long, device=device)  # current window per row
        self.sa_is_image = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)  # insertion

    def begin(self, step):
        """A forward with step.pos.size(1) new tokens starts."""
        self.sa.begin(step.pos.size(1))
        if self.ca_text is not None:
            self.ca_text.begin(step.pos.size(1))
        if step.win is not None:
            self.ca_image.begin(step.bank_win.size(1))

    def commit(self, step):
        """After a forward: record positions, windows, which slots stay valid."""
        B, T = step.pos.shape
        valid = step.valid if step.valid is not None else torch.ones(B, T, dtype=torch.bool, device=step.pos.device)
        if self.config.insert_images:
            cap = self.sa.k.size(3)
            is_img = torch.zeros(B, cap, dtype=torch.bool, device=valid.device)
            is_img[:, : self.sa.length] = self.sa_is_image[:, : self.sa.length]
            is_img[:, self.sa.length : self.sa.length + T] = step.is_image
            self.sa.commit(step.pos, valid)
            self.sa_is_image = self.sa.compact(extra=is_img)  # drop padding of shorter rows
            self.next_pos = self.next_pos + valid.sum(1)
            return
        if self.sa.n_new:
            self.sa.commit(step.pos, valid)
        self.next_pos = self.next_pos + T
        if self.ca_text is not None:  # keep only the text of each row's current (last) window
            old_len = self.ca_text.length
            self.ca_text.commit(step.pos, step.win == step.last_win[:, None])
            keep = torch.ones(B, self.ca_text.length, dtype=torch.bool, device=valid.device)
            keep[:, :old_len] = (step.last_win == self.window)[:, None]
            self.ca_text.drop(keep)
        if self.ca_image.n_new:  # new images; without D5 keep only each row's newest
            self.ca_image.commit(step.bank_win, step.bank_ok)
        if not self.config.ca_all_images and self.ca_image.length:
            self.ca_image.drop(self.ca_image.pos[:, : self.ca_image.length] == step.last_win[:, None])
        self.window = step.last_win

    def entries(self):
        """Cached entries per layer kind: self-attention, CA image, CA window text (ca_tv).
        Counted per layer of that kind, summed over the batch."""
        return {
            "self_attn": self.sa.entries(),
            "cross_attn_image": self.ca_image.entries(),
            "cross_attn_text": self.ca_text.entries() if self.ca_text is not None else 0,
        }

    def nbytes(self):
        """Bytes held by the keys and values in use, every layer."""
        return sum(store.nbytes() for store in (self.sa, self.ca_image, self.ca_text) if store is not None)


# -----------------------------------------------------------------------------
# Prompts, images and checkpoints: the small conventions train.py, sample.py and stream.py share


def pick_device(name="auto"):
    """The device train.py, sample.py and stream.py run on: 'auto' is CUDA if there is one, then
    Apple's MPS, then the CPU; any other name is taken as it is."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def encode_turn(tokenizer, prompt, answer=None):
    """Token ids of one conversation turn: prompt, <|answer|>, then (when given) the answer and
    <|endoftext|>. Returns (ids, n_prompt): the loss goes on ids[n_prompt:], the answer and its end."""
    ids = tokenizer.encode(prompt, allowed_special={IMAGE}) + tokenizer.encode(ANSWER, allowed_special={ANSWER})
    n_prompt = len(ids)
    if answer is not None:
        ids += tokenizer.encode(answer, disallowed_special=()) + tokenizer.encode(ENDOFTEXT, allowed_special={ENDOFTEXT})
    return ids, n_prompt


def load_image(source, image_size):
    """An image file (any size or mode) or a PIL image -> float tensor (3, image_size, image_size)
    in [0, 1]: converted to RGB and resized, as the model expects."""
    from PIL import Image

    if not isinstance(source, Image.Image):
        try:
            source = Image.open(source)
        except FileNotFoundError:
            raise FileNotFoundError(f"image file not found: {source}") from None
        except OSError as e:
            raise ValueError(f"cannot read image {source}: {e}") from None
    img = source.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(image_size, image_size, 3).permute(2, 0, 1).float() / 255.0


def save_checkpoint(path, model, **extra):
    """Write {'model': state_dict, 'config': dict, **extra} atomically: a temporary file in the same
    folder, then a rename, so an interrupted save never leaves a broken checkpoint behind."""
    import dataclasses
    import os

    raw = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    ckpt = {"model": raw.state_dict(), "config": dataclasses.asdict(raw.config), **extra}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """Rebuild the model a checkpoint was saved from. Returns (model, checkpoint dict).
    Loads with weights_only=True: a checkpoint holds tensors and plain Python values only."""
    import os

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (train one with: python train.py --out_dir=...)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # not a torch file at all (text, empty, truncated, foreign pickle)
        raise ValueError(f"{path} is not a casa checkpoint (torch.load failed: {type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a casa checkpoint (expected keys 'model' and 'config')")
    try:
        config = Config(**ckpt["config"])
    except TypeError as e:
        raise ValueError(f"{path} was saved with a config this casa.py does not know: {e}") from None
    model = VLM(config)
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


# -----------------------------------------------------------------------------
# Analysis: what each variant caches, weighs, computes, and where its attention goes


def kv_formula(config):
    """The paper's #KV column for this variant (k turns, T text tokens and one N-token image each)."""
    if config.insert_images or config.ca_all_images:
        return "kT + kN"
    if config.ca_replaces_sa:
        return "kT (SA layers) or N (CA layers)"
    return "kT + (T + N)" if config.ca_text_keys else "kT + N"


def kv_cache_entries(config, turns, text_tokens, image_tokens=None):
    """Analytic cached entries per layer of each kind after `turns` turns, each turn one image of
    N tokens (default: config.n_image_tokens) and T text tokens (its <|image|> marker included)."""
    k, T = turns, text_tokens
    N = config.n_image_tokens if image_tokens is None else image_tokens
    has_ca = any(c for _, c in config.layer_kinds())
    return {
        "self_attn": k * T + (k * N if config.insert_images else 0),
        # only the current window's image; with D5 every image so far
        "cross_attn_image": (k * N if config.ca_all_images else N) if k > 0 and has_ca else 0,
        "cross_attn_text": T if k > 0 and config.ca_text_keys else 0,  # only the current window's text
    }


def kv_cache_bytes(config, turns, text_tokens, image_tokens=None, batch_size=1, bytes_per_value=4):
    """Analytic KV-cache bytes (keys and values, every layer) after `turns` turns: the formula that
    Cache.nbytes() measures. bytes_per_value: 4 for float32, 2 for bf16."""
    e = kv_cache_entries(config, turns, text_tokens, image_tokens)
    kinds = config.layer_kinds()
    n_sa, n_ca = sum(s for s, _ in kinds), sum(c for _, c in kinds)
    per_entry = 2 * config.n_embd * bytes_per_value  # K and V, all heads
    entries = n_sa * e["self_attn"] + n_ca * (e["cross_attn_image"] + e["cross_attn_text"])
    return batch_size * entries * per_entry


def is_fusion_param(name):
    """Whether a parameter belongs to the fusion (a CA layer's projections or norm)."""
    return ".ca." in name or ".ln_ca." in name


def param_counts(model):
    """Parameters split into vision (encoder + projection), fusion (CA projections and norms), and
    text (embeddings, SA, MLPs). Tied weights are counted once."""
    counts = {"vision": 0, "text": 0, "fusion": 0}
    for name, p in model.named_parameters():
        if name.startswith("vision."):
            counts["vision"] += p.numel()
        elif is_fusion_param(name):
            counts["fusion"] += p.numel()
        else:
            counts["text"] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def flops_per_text_token(config, text_tokens, image_tokens=None):
    """Forward FLOPs per text token for one turn: one image of N tokens and T text tokens (marker
    first), nothing cached before. Multiply-adds count 2; matmuls only (norms, softmax, activations
    left out); causal attention counts the keys each query really sees. Returns a breakdown:
    'linear' (text and fusion projections, MLPs, lm_head), 'attention' (scores and weighted sums),
    'vision' (the encoder, amortised over the T text tokens), and 'total'."""
    C, V, T = config.n_embd, config.vocab_size, text_tokens
    N = config.n_image_tokens if image_tokens is None else image_tokens
    proj, mlp = 2 * 4 * C * C, 2 * 8 * C * C  # q, k, v, o; fc + proj

    def causal(n):  # sum over n causal queries of the keys they see
        return n * (n + 1) // 2

    linear = attention = 0
    if config.insert_images:  # the stream holds T + N tokens; every one goes through every layer
        linear = config.n_layer * (T + N) * (proj + mlp)
        attention = config.n_layer * 4 * C * causal(T + N)
    else:
        for has_sa, has_ca in config.layer_kinds():
            linear += T * mlp
            if has_sa:
                linear += T * proj
                attention += 4 * C * causal(T)
            if has_ca:
                linear += N * 2 * 2 * C * C  # image K/V, once per image
                if not config.ca_shared:
                    linear += T * 2 * 2 * C * C  # q and o (shared: reuses SA's)
                attention += 4 * C * T * N
                if config.ca_text_keys:
                    linear += T * 2 * 2 * C * C  # window text K/V
                    attention += 4 * C * causal(T)
                if config.ca_image_ffn:
                    linear += N * mlp
    linear += T * 2 * C * V  # lm_head
    Cv, S = config.n_vis_embd, config.image_size
    n = config.patch_size.bit_length() - 1
    widths = [max(Cv >> (n - 1 - i), 1) for i in range(n)]
    vision = N * 2 * Cv * C  # projection to the text width
    for i, (c_in, c_out) in enumerate(zip([3] + widths, widths)):  # the stem's 3x3 convs, full resolution
        vision += (S >> i) ** 2 * 2 * 9 * c_in * c_out
    vision += config.n_vis_layer * (N * (2 * 4 * Cv * Cv + 2 * 8 * Cv * Cv) + 4 * Cv * N * N)
    out = {"linear": linear / T, "attention": attention / T, "vision": vision / T}
    out["total"] = sum(out.values())
    return out


@torch.no_grad()
def attention_mass(model, idx, images):
    """Where text attention goes, in the layers whose softmax holds both text and image keys
    (ca_tv's CA layers: the "implicit gate"; insertion's SA layers). For each such layer and head:
    the share of attention that text queries (those that can see an image) give to image keys; the
    rest goes to text keys. Returns a (n_layers, n_head) tensor; rows follow the layers in order."""
    config = model.config
    if config.insert_images:
        attns = [b.sa for b in model.blocks]
    elif config.ca_text_keys:
        attns = [b.ca for b in model.blocks if b.has_ca]
    else:
        raise ValueError(f"variant {config.variant!r} never puts text and image keys in one softmax; "
                         "attention_mass is defined for 'ca_tv' and 'insertion'")
    for a in attns:
        a.record = []
    try:
        model(idx, images)
        shares = []
        for a in attns:
            probs, mask, key_is_image = a.record[0]  # (B, H, Tq, Tk), (B, Tq, Tk), (B, Tk) or (Tk,)
            B, H, Tq, Tk = probs.shape
            key_is_image = key_is_image.expand(B, Tk)
            sees_image = (mask & key_is_image[:, None, :]).any(-1)  # (B, Tq)
            if config.insert_images:  # queries are the stream: keep real text tokens only
                is_self = torch.eye(Tq, dtype=torch.bool, device=mask.device)[None]
                sees_image &= ~key_is_image & (mask & is_self).any(-1)
            to_image = (probs * key_is_image[:, None, None, :]).sum(-1)  # (B, H, Tq)
            w = sees_image[:, None, :].float()
            shares.append((to_image * w).sum((0, 2)) / w.sum((0, 2)).clamp(min=1))
        return torch.stack(shares)
    finally:
        for a in attns:
            a.record = None
