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

plus the paper's ladder from CA to insertion (D1-D5), each one switch in VARIANTS below.

Reading order, each part using only what is above it or passed in: tokenizer, building blocks
(norm, RoPE, attention, MLP), vision encoder, config (the variants), the KV cache, the layout of
one forward call (positions, masks, image slots), the transformer block, the model and generation,
checkpoints, analysis helpers.
"""

import math
import os
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

    def heads(self, x):  # (B, T, C) -> (B, H, T, D)
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def project_q(self, x):
        return self.heads(self.q(x))

    def project_kv(self, x):
        k, v = self.kv(x).chunk(2, dim=-1)
        return self.heads(k), self.heads(v)

    def attend(self, q, k, v, mask):
        """attend() (a method so that attention_mass can swap in a recording copy per layer)."""
        return attend(q, k, v, mask)

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
        self.ln_stem = RMSNorm(vd) if config.stem_norm else nn.Identity()
        self.row_emb = nn.Parameter(torch.zeros(grid, 1, vd))
        self.col_emb = nn.Parameter(torch.zeros(1, grid, vd))
        self.blocks = nn.ModuleList(VisionBlock(vd, config.n_vis_head) for _ in range(config.n_vis_layer))
        self.ln_f = RMSNorm(vd)
        self.proj = nn.Linear(vd, config.n_embd, bias=False)
        self.ln_out = RMSNorm(config.n_embd)

    def forward(self, images):  # (M, 3, H, W) in [0, 1]
        x = self.ln_stem(self.stem(images * 2 - 1).permute(0, 2, 3, 1))  # (M, grid, grid, vd), each token at RMS 1
        x = x + self.row_emb + self.col_emb
        x = x.flatten(1, 2)  # (M, N, vd), patches row by row
        for block in self.blocks:
            x = block(x)
        return self.ln_out(self.proj(self.ln_f(x)))  # (M, N, n_embd)


class QueryCompressor(nn.Module):
    """Compressed insertion (the paper's Table 5b, a Q-Former-style block): Q learned queries attend
    to one image's N tokens, then an MLP; only their Q outputs enter the text stream, so insertion's
    cache grows by Q per image instead of N. Used when config.compress_queries > 0 (insertion only)."""

    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.queries = nn.Parameter(torch.randn(config.compress_queries, C) * C**-0.5)  # (Q, C)
        self.ln_q, self.ln_img = RMSNorm(C), RMSNorm(C)
        self.attn = Attention(config)
        self.ln_mlp = RMSNorm(C)
        self.mlp = MLP(C, config.bias, config.dropout)
        self.ln_out = RMSNorm(C)  # on the text's scale, as the encoder's tokens are

    def forward(self, img):  # (M, N, C) -> (M, Q, C)
        q = self.attn.project_q(self.ln_q(self.queries).expand(img.size(0), -1, -1))  # the same Q for every image
        k, v = self.attn.project_kv(self.ln_img(img))
        x = self.queries + self.attn.merge(F.scaled_dot_product_attention(q, k, v))  # each query sees all N
        x = x + self.mlp(self.ln_mlp(x))
        return self.ln_out(x)


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
    # RMS-normalise each token of the conv stem's output before the position embeddings: without it
    # every conv-pool stage shrinks the image's signal about 3x at init, and after four stages (16 px
    # patches) it is ~0.01 beside position embeddings that grow to ~0.1 (shapes a few pixels wide
    # were then never learned; docs/recipe.md). False: the models trained before it existed
    stem_norm: bool = True
    # initial std of the encoder's row and column embeddings. The stem's tokens are at RMS 1 (stem_norm):
    # position embeddings that start at 0 stay ~0.02 after thousands of steps, too faint for "which
    # column is the red shape in" or "is it left of the blue one" to be read (docs/recipe.md). 0: the
    # models trained before it existed
    pos_std: float = 0.5
    # draw the stem's conv weights as He et al. (2015) do for ReLU-like activations, N(0, 2 / fan_in),
    # biases 0. PyTorch's default (False) draws a third of that variance, and the image's signal
    # shrinks ~3x a conv-GELU-pool stage; trained alone on one small shape's name, the encoder then
    # sat at chance for 600 steps at two seeds of three, and with this init left it by step 360-480 at
    # all three. Off by default: in the VLM it helped `ca` at one seed and cost insertion 0.08-0.10
    # on a relations set at two (docs/recipe.md)
    stem_he_init: bool = False
    # initialisation of the text side (embeddings, attention, MLPs, fusion): weights ~ N(0, init_std^2),
    # residual projections scaled down by sqrt(2 n_layer); 0: 1/sqrt(n_embd) (GPT-2 uses 0.02)
    init_std: float = 0.0
    # fusion: one of VARIANTS
    variant: str = "ca"
    # the paper's Table 5: CA layers in every n-th block only (blocks 0, n, 2n, ...; the others are
    # plain SA blocks; 1: every block), and compressed insertion (Q tokens per image enter the stream)
    ca_every: int = 1
    compress_queries: int = 0  # insertion only; 0: no compression, all N image tokens enter the stream

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
        if self.ca_every < 1 or (self.ca_every > 1 and (self.insert_images or self.ca_replaces_sa)):
            raise ValueError(f"ca_every ({self.ca_every}) must be >= 1, and > 1 only for the CA variants that "
                             "have CA beside SA (not insertion; ca_replace already alternates)")
        if self.compress_queries < 0 or (self.compress_queries and not self.insert_images):
            raise ValueError(f"compress_queries ({self.compress_queries}) must be >= 0, and > 0 only for insertion")

    # the variant's switches, read from VARIANTS
    insert_images = property(lambda self: VARIANTS[self.variant]["insert_images"])
    ca_shared = property(lambda self: VARIANTS[self.variant]["ca_shared"])
    ca_text_keys = property(lambda self: VARIANTS[self.variant]["ca_text_keys"])
    ca_replaces_sa = property(lambda self: VARIANTS[self.variant]["ca_replaces_sa"])
    ca_image_ffn = property(lambda self: VARIANTS[self.variant]["ca_image_ffn"])
    ca_all_images = property(lambda self: VARIANTS[self.variant]["ca_all_images"])

    @property
    def keeps_every_frame(self):
        """Whether the cache keeps every image's tokens (insertion; ca_all, D5): it grows by kN."""
        return self.insert_images or self.ca_all_images

    @property
    def n_image_tokens(self):
        """N: the encoder's tokens per image."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_image(self):
        """The tokens an image puts where the text attends to it: Q with compressed insertion, else N."""
        return self.compress_queries or self.n_image_tokens

    def layer_kinds(self):
        """(has_sa, has_ca) for each layer: the one place the layer structure is decided. Insertion
        has SA only; ca_replace (D3) alternates SA and CA layers; every other variant has both, CA in
        every ca_every-th block from the first (the first, so later layers can pass on what it read)."""
        if self.insert_images:
            return [(True, False)] * self.n_layer
        if self.ca_replaces_sa:
            return [(i % 2 == 0, i % 2 == 1) for i in range(self.n_layer)]
        return [(True, i % self.ca_every == 0) for i in range(self.n_layer)]

    def layer_counts(self):
        """(number of layers with self-attention, number with cross-attention)."""
        kinds = self.layer_kinds()
        return sum(has_sa for has_sa, _ in kinds), sum(has_ca for _, has_ca in kinds)


# -----------------------------------------------------------------------------
# The KV cache: what streaming keeps between calls. Built before the model so the model's blocks
# can use it; every method takes what it needs as arguments.


class KVStore:
    """Keys and values of one kind of attention (self-attention, CA image or CA window text) for
    the layers that have it, and one set of flags per slot, shared by those layers:

        k[i], v[i]   (B, H, capacity, D)  for each layer i in `layers` (model layer indices)
        pos          (B, capacity)        position of the slot (for CA image slots: its window)
        valid        (B, capacity)        False: padding of a shorter row, or dropped

    Slots [0, length) are filled. One forward call: begin(n) makes room for n new slots in every
    layer at once, each layer then writes its own (write(i, k, v)), in any order, and commit() records
    the new slots' flags. When full, the capacity doubles: O(1) amortised, but the call that grows
    copies everything (a stall); a capacity reserved up front avoids it."""

    def __init__(self, layers, batch_size, n_head, head_dim, device, capacity=0):
        self.layers = list(layers)
        self.capacity = capacity  # slots per row to keep room for between calls (0: grow as needed)
        self.shape = (batch_size, n_head, head_dim)
        self.device = device
        self.k, self.v = {}, {}
        self.pos = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        self.length = 0  # slots filled
        self.n_new = 0  # slots the current call writes

    def begin(self, n, dtype):
        """Make room for n new slots in every layer (and the flags) before the layers run."""
        self.n_new = n if self.layers else 0  # a store without layers keeps nothing
        first = self.k.get(self.layers[0]) if self.layers else None
        need = self.length + self.n_new
        if not self.layers or (first is not None and first.dtype == dtype and need <= first.size(2)):
            return
        # grow (or allocate, or change dtype: the first call under autocast); torch.empty, not
        # zeros: only filled slots are ever read
        cap = first.size(2) if first is not None and first.dtype == dtype else 0
        new_cap = max(need, 2 * cap, 16, self.capacity + self.n_new)  # a call writes before it evicts
        B, H, D = self.shape
        for store in (self.k, self.v):
            for i in self.layers:
                t = torch.empty(B, H, new_cap, D, dtype=dtype, device=self.device)
                if i in store:
                    t[:, :, : self.length] = store[i][:, :, : self.length]
                store[i] = t
        grow = new_cap - self.pos.size(1)
        if grow > 0:
            self.pos = torch.cat([self.pos, self.pos.new_zeros(B, grow)], dim=1)
            self.valid = torch.cat([self.valid, self.valid.new_zeros(B, grow)], dim=1)

    def write(self, i, k, v):
        """Layer i's new keys/values k, v (B, H, n_new, D) -> all of layer i's (B, H, length + n_new, D)."""
        end = self.length + self.n_new
        self.k[i][:, :, self.length : end] = k
        self.v[i][:, :, self.length : end] = v
        return self.k[i][:, :, :end], self.v[i][:, :, :end]

    def commit(self, pos, valid):
        """After every layer wrote: the new slots' flags, each (B, n_new)."""
        if not self.layers:
            return
        new = slice(self.length, self.length + self.n_new)
        self.pos[:, new], self.valid[:, new] = pos, valid
        self.length += self.n_new
        self.n_new = 0

    def mask(self, pos, valid):
        """Self-attention mask (B, T, length + T) for T new queries at positions pos (B, T): every
        cached valid slot, and the new tokens causally (valid ones only)."""
        B, T = pos.shape
        old = self.valid[:, None, : self.length].expand(B, T, self.length)
        new = torch.ones(T, T, dtype=torch.bool, device=pos.device).tril()[None] & valid[:, None, :]
        return torch.cat([old, new], dim=2)

    def keep(self, keep):
        """Drop the filled slots where keep (B, length) is False; move each row's kept slots to the
        front, in order, and shrink length to the longest row."""
        valid = self.valid[:, : self.length] & keep
        if bool(valid.all()):
            return
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # kept slots first
        B, H, D = self.shape
        idx = order[:, None, :, None].expand(B, H, -1, D)
        for store in (self.k, self.v):
            for i in store:
                store[i][:, :, : self.length] = store[i][:, :, : self.length].gather(2, idx)
        self.pos[:, : self.length] = self.pos[:, : self.length].gather(1, order)
        self.valid[:, : self.length] = valid.gather(1, order)
        self.length = int(valid.sum(1).max())

    def entries(self):
        """Cached (valid) entries per layer, summed over the batch."""
        return int(self.valid[:, : self.length].sum()) if self.layers else 0

    def allocated_bytes(self):
        """Bytes of the key/value tensors as allocated: the whole capacity, unused slots included."""
        return sum(t.numel() * t.element_size() for store in (self.k, self.v) for t in store.values())

    def nbytes(self):
        """Bytes of keys and values in use, all layers."""
        if not self.k:
            return 0
        B, H, D = self.shape
        element = next(iter(self.k.values())).element_size()
        return self.entries() * len(self.layers) * H * D * 2 * element


class Cache:
    """KV cache for streaming. What each variant keeps (k turns of T text tokens, N image tokens):

        insertion   SA layers: every text and image token              kT + kN per layer
        ca, ...     SA layers: text only; CA layers: the current image  kT + N
        ca_tv       as ca, plus the current window's text in CA layers  kT + (T + N)
        ca_replace  SA layers (half): text; CA layers (half): image     kT or N
        ca_all      SA layers: text only; CA layers: every image so far kT + kN

    Three stores; a store whose attention the variant lacks has no layers and stays empty. Image K/V
    are computed once, when the image arrives. Make one with model.new_cache(batch_size, ...):

    capacity: entries per row to reserve up front in each store, a dict with the keys of entries()
        (kv_cache_entries(config, turns, T) gives them for a session of known length); room for one
        call's new slots comes on top, since a call writes its image before the old one is dropped.
        Without it a store doubles when full, and the call that grows it stalls while it copies.
    sink_tokens, recent_tokens: a bounded self-attention cache for endless streams, as StreamingLLM
        (Xiao et al. 2023, "attention sinks"): after each call only the first sink_tokens and the
        last recent_tokens tokens of each row stay; the middle is evicted. Positions go on counting.
        With one image in its CA store, a CA variant's whole cache then stays constant and only old
        text is lost. Insertion's image tokens live in the same cache, so its window slides over
        frames and text alike: the cache stays constant too, but old frames are dropped (the
        window is all it remembers). ca_all keeps every image in its CA store, which this does not bound."""

    def __init__(self, config, batch_size, device, capacity=None, sink_tokens=0, recent_tokens=None):
        if recent_tokens is not None and config.ca_all_images and not config.insert_images:
            raise ValueError(f"variant {config.variant!r} keeps every frame's image tokens in its CA layers; "
                             "recent_tokens bounds the self-attention cache only: pick insertion (its window "
                             "drops old frames) or a variant with one image in its CA layers (ca, ca_shared, "
                             "ca_tv, ca_replace, ca_ffn)")
        if sink_tokens < 0 or (recent_tokens is not None and recent_tokens < 1):
            raise ValueError(f"sink_tokens must be >= 0 and recent_tokens >= 1 (or None: unbounded); got "
                             f"{sink_tokens} and {recent_tokens}")
        capacity = capacity or {}
        unknown = set(capacity) - {"self_attn", "cross_attn_image", "cross_attn_text"}
        if unknown:
            raise ValueError(f"capacity keys are self_attn, cross_attn_image, cross_attn_text (as entries() "
                             f"and kv_cache_entries give them); got {sorted(unknown)}")
        H, D = config.n_head, config.n_embd // config.n_head
        kinds = config.layer_kinds()
        sa_layers = [i for i, (has_sa, _) in enumerate(kinds) if has_sa]
        ca_layers = [i for i, (_, has_ca) in enumerate(kinds) if has_ca]
        self.config, self.batch_size = config, batch_size
        self.sink_tokens, self.recent_tokens = sink_tokens, recent_tokens
        self.sa = KVStore(sa_layers, batch_size, H, D, device, capacity.get("self_attn", 0))
        # CA image K/V; a slot's pos is its window. Without D5 only the current window's is kept
        self.ca_image = KVStore(ca_layers, batch_size, H, D, device, capacity.get("cross_attn_image", 0))
        self.ca_text = KVStore(ca_layers if config.ca_text_keys else [], batch_size, H, D, device,
                               capacity.get("cross_attn_text", 0))
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # next stream position
        self.window = torch.zeros(batch_size, dtype=torch.long, device=device)  # current window per row

    def begin(self, layout, dtype):
        """A forward call with this layout starts: make room in every store at once."""
        self.sa.begin(layout.pos.size(1), dtype)
        self.ca_image.begin(layout.slot_win.size(1), dtype)
        self.ca_text.begin(layout.win.size(1), dtype)

    def commit(self, layout):
        """After the call: record the new slots' flags, drop what the variant does not keep."""
        self.sa.commit(layout.pos, layout.valid)
        keep = self.sa.valid[:, : self.sa.length]  # drops insertion's padding of shorter rows
        if self.recent_tokens is not None:  # evict the middle: keep the sinks and the recent tokens
            rank = keep.cumsum(1) - 1  # (B, S) rank among each row's valid slots
            n = keep.sum(1, keepdim=True)
            keep = keep & ((rank < self.sink_tokens) | (rank >= n - self.recent_tokens))
        self.sa.keep(keep)
        self.next_pos = self.next_pos + layout.valid.sum(1)
        # ca_tv's window text: only each row's current (last) window stays
        still_open = layout.last_win == self.window  # (B,) the row's old window goes on
        old = self.ca_text.length
        in_last = layout.win == layout.last_win[:, None]  # (B, T)
        self.ca_text.commit(layout.pos, in_last)
        keep = torch.ones(self.batch_size, self.ca_text.length, dtype=torch.bool, device=still_open.device)
        keep[:, :old] = still_open[:, None]
        self.ca_text.keep(keep)
        # images: one slot of N per new image; without D5 only each row's newest stays
        self.ca_image.commit(layout.slot_win, layout.slot_ok)
        if not self.config.ca_all_images:
            self.ca_image.keep(self.ca_image.pos[:, : self.ca_image.length] == layout.last_win[:, None])
        self.window = layout.last_win

    def entries(self):
        """Cached entries per layer kind: self-attention, CA image, CA window text (ca_tv).
        Counted per layer of that kind, summed over the batch."""
        return {"self_attn": self.sa.entries(), "cross_attn_image": self.ca_image.entries(),
                "cross_attn_text": self.ca_text.entries()}

    def nbytes(self):
        """Bytes held by the keys and values in use, every layer."""
        return self.sa.nbytes() + self.ca_image.nbytes() + self.ca_text.nbytes()

    def allocated_bytes(self):
        """Bytes of the key/value tensors as allocated (what the memory really holds)."""
        return self.sa.allocated_bytes() + self.ca_image.allocated_bytes() + self.ca_text.allocated_bytes()


# -----------------------------------------------------------------------------
# The layout of one forward call: where every token sits and what it may attend to. Computed once,
# vectorised, from idx and the cache, then passed to every block.


@dataclass
class Layout:
    """Positions, masks and image slots of one forward call. Every field is set for every variant.

    Shapes: B rows, T new text tokens a row, L stream tokens a row (insertion: the text with N image
    tokens after each <|image|> marker, shorter rows padded; every other variant: L = T), M new images
    of N tokens, W = the most new images in one row, S cached slots. Windows: window w of a row starts
    at its w-th marker and runs to the next one; window 0 is the text before the first image. Window
    numbers and positions go on counting across calls through the cache."""

    pos: torch.Tensor  # (B, L) position of each stream token (what RoPE rotates by)
    valid: torch.Tensor  # (B, L) False on padding
    is_image: torch.Tensor  # (B, L) True on image tokens in the stream (insertion only)
    text_idx: torch.Tensor  # (B, T) where each text token sits in the stream (arange(T) but insertion)
    sa_mask: torch.Tensor | None  # (B, L, S + L) keys each query sees in self-attention; None = causal
    win: torch.Tensor  # (B, T) window of each text token
    last_win: torch.Tensor  # (B,) the window each row ends in
    image_slot: torch.Tensor  # (B, W) index into the M new images of the row's w-th new one, or -1
    slot_win: torch.Tensor  # (B, W*N) window of each new image key: one slot of N keys per image
    slot_ok: torch.Tensor  # (B, W*N) False on unused slots (a row with fewer new images)
    image_pos: torch.Tensor  # (M,) position of each new image's marker (ca_tv rotates its keys by it)
    ca_mask: torch.Tensor  # (B, T, keys): cached image slots, new ones [, cached window text, new text]
    run_ca: bool  # False when no image exists anywhere: CA's output would be 0 (ca_tv always runs)


def make_layout(config, idx, is_marker, n_image_tokens, cache):
    """The Layout of a call with text idx (B, T), is_marker (B, T) its <|image|> markers, one new image
    of n_image_tokens per marker (0: no new images), and the cache (None: no cache)."""
    B, T = idx.shape
    device = idx.device
    N = n_image_tokens
    arange = lambda n: torch.arange(n, device=device)  # noqa: E731

    # the stream: insertion lays N image tokens after each marker; every other variant keeps the text
    if config.insert_images:
        width = 1 + N * is_marker.long()  # stream slots each text token opens
        text_idx = width.cumsum(1) - width  # (B, T)
        lengths = width.sum(1)  # (B,)
    else:
        text_idx = arange(T).expand(B, T)
        lengths = torch.full((B,), T, device=device)
    L = int(lengths.max())
    valid = arange(L)[None] < lengths[:, None]  # (B, L)
    is_image = torch.ones(B, L, dtype=torch.bool, device=device).scatter(1, text_idx, False) & valid
    start = cache.next_pos if cache is not None else torch.zeros(B, dtype=torch.long, device=device)
    pos = start[:, None] + arange(L)

    # self-attention: cached slots, then the new tokens causally (padding hidden)
    if cache is not None:
        sa_mask = cache.sa.mask(pos, valid)
    else:
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        sa_mask = None if bool(valid.all()) else causal[None] & valid[:, None, :]

    # windows, and the image slots: the new images in reading order, one slot of N keys per window
    w0 = cache.window if cache is not None else torch.zeros(B, dtype=torch.long, device=device)
    win = w0[:, None] + is_marker.cumsum(dim=1)  # (B, T)
    last_win = win[:, -1]
    n_new = is_marker.sum(dim=1) if N else torch.zeros(B, dtype=torch.long, device=device)
    W = int(n_new.max())
    first = n_new.cumsum(0) - n_new  # index of each row's first new image
    image_slot = torch.where(arange(W) < n_new[:, None], first[:, None] + arange(W), -1)  # (B, W)
    slot_win = (w0[:, None] + 1 + arange(W)).repeat_interleave(N, dim=1)  # (B, W*N)
    slot_ok = (image_slot >= 0).repeat_interleave(N, dim=1)

    # cross-attention: a query sees its own window's image; with D5 every image so far
    key_win, key_ok = slot_win, slot_ok
    if cache is not None:  # image slots cached by earlier calls come first
        key_win = torch.cat([cache.ca_image.pos[:, : cache.ca_image.length], key_win], dim=1)
        key_ok = torch.cat([cache.ca_image.valid[:, : cache.ca_image.length], key_ok], dim=1)
    q_win = win[:, :, None]
    see = (key_win[:, None, :] <= q_win) if config.ca_all_images else (key_win[:, None, :] == q_win)
    ca_mask = see & key_ok[:, None, :]
    if config.ca_text_keys:  # D2: the window's text joins the keys, causally
        same_win = (win[:, :, None] == win[:, None, :]) & torch.ones(T, T, dtype=torch.bool, device=device).tril()
        parts = [ca_mask, same_win]
        if cache is not None:  # cached window text belongs to window w0: visible while it lasts
            cached = cache.ca_text.valid[:, None, : cache.ca_text.length] & (win == w0[:, None])[:, :, None]
            parts.insert(1, cached)
        ca_mask = torch.cat(parts, dim=2)
    has_images = N > 0 or (cache is not None and cache.ca_image.length > 0)
    return Layout(pos=pos, valid=valid, is_image=is_image, text_idx=text_idx, sa_mask=sa_mask, win=win,
                  last_win=last_win, image_slot=image_slot, slot_win=slot_win, slot_ok=slot_ok,
                  image_pos=pos.gather(1, text_idx)[is_marker],
                  ca_mask=ca_mask, run_ca=has_images or config.ca_text_keys)


# -----------------------------------------------------------------------------
# The transformer block: text self-attention, cross-attention, or both, then the MLP.


def rope_inv_freq(config):
    head_dim = config.n_embd // config.n_head
    return 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))


def to_slots(t, image_slot):
    """Per-image keys or values (M, H, N, D) -> each row's image slots (B, H, W*N, D), in reading
    order. Unused slots (image_slot -1) hold a copy of image 0; the masks hide them."""
    B, W = image_slot.shape
    M, H, N, D = t.shape
    if W == 0 or M == 0:
        return t.new_zeros(B, H, 0, D)
    return t[image_slot.clamp(min=0)].permute(0, 2, 1, 3, 4).reshape(B, H, W * N, D)


class Block(nn.Module):
    """One pre-norm block of the text transformer, layer layer_idx of the model:

        SA only   (insertion; even layers of ca_replace):   x += SA(ln_sa(x))
        SA + CA   (ca, ca_tv, ca_ffn):                       x += SA(ln_sa(x)) + CA(ln_ca(x))
        SA + CA, shared projections (ca_shared):            x += o(attn_sa(q, k, v) + attn_ca(q, k_img, v_img))
        CA only   (odd layers of ca_replace):                x += CA(ln_ca(x))
    then x += MLP(ln_mlp(x)). With ca_ffn the image tokens also take img += MLP(ln_mlp(img)) here.
    has_sa and has_ca come from config.layer_kinds()."""

    def __init__(self, config, layer_idx, has_sa, has_ca):
        super().__init__()
        self.layer_idx = layer_idx  # which layer's K/V it writes in the cache
        self.has_sa, self.has_ca = has_sa, has_ca
        self.ca_text_keys = config.ca_text_keys
        self.ca_image_ffn = config.ca_image_ffn
        self.shared = config.ca_shared
        if has_sa:
            self.ln_sa = RMSNorm(config.n_embd)
            self.sa = Attention(config)
        if has_ca and not self.shared:
            self.ln_ca = RMSNorm(config.n_embd)
            self.ca = Attention(config)
        self.ln_mlp = RMSNorm(config.n_embd)
        self.mlp = MLP(config.n_embd, config.bias, config.dropout)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def init_ca_from_sa(self):
        """The paper initialises CA projections from the same block's SA weights."""
        if self.has_sa and self.has_ca and not self.shared:
            self.ca.load_state_dict(self.sa.state_dict())

    def forward(self, x, img, layout, cache=None):
        """x (B, L, C): the text (insertion: the mixed stream); img (M, N, C): this call's new image
        tokens, or None; layout: the call's Layout; cache: the Cache, or None.
        Returns (x, img): img changes only with ca_ffn."""
        out = 0
        if self.has_sa:
            h = self.ln_sa(x)
            q_raw = self.sa.project_q(h)
            k, v = self.sa.project_kv(h)
            q, k = rope(q_raw, layout.pos, self.inv_freq), rope(k, layout.pos, self.inv_freq)
            if cache is not None:  # write the new K/V, attend over everything cached
                k, v = cache.sa.write(self.layer_idx, k, v)
            y = self.sa.attend(q, k, v, layout.sa_mask)
            if self.shared and self.has_ca and layout.run_ca:  # D1: CA reuses q (unrotated: no positions in CA),
                y = y + self.cross_attend(x, img, layout, cache, q=q_raw)  # the k/v weights and o
            out = self.sa.merge(y)
        if self.has_ca and not self.shared and layout.run_ca:
            out = out + self.ca.merge(self.cross_attend(x, img, layout, cache))
        x = x + out
        x = x + self.mlp(self.ln_mlp(x))
        if self.ca_image_ffn and img is not None:  # D4: image tokens go through the FFN too
            img = img + self.mlp(self.ln_mlp(img))
        return x, img

    def cross_attend(self, x, img, layout, cache, q=None):
        """Text queries attend to their window's image (and, for ca_tv, the window's text).
        Returns (B, H, T, D) before the output projection."""
        ln, attn = (self.ln_sa, self.sa) if self.shared else (self.ln_ca, self.ca)
        h = ln(x)
        if q is None:
            q = attn.project_q(h)
            if self.ca_text_keys:  # D2: positions inside the layer, relative to the image
                q = rope(q, layout.pos, self.inv_freq)
        B, H, T, D = q.shape
        k = v = q.new_zeros(0, H, 0, D)  # image keys/values (M, H, N, D) of this call's new images
        if img is not None:
            k, v = attn.project_kv(ln(img))
            if self.ca_text_keys:  # rotated to their marker's position
                k = rope(k, layout.image_pos[:, None].expand(-1, k.size(2)), self.inv_freq)
        k, v = to_slots(k, layout.image_slot), to_slots(v, layout.image_slot)  # (B, H, W*N, D)
        if cache is not None:  # images cached by earlier calls come first
            k, v = cache.ca_image.write(self.layer_idx, k, v)
        if self.ca_text_keys:  # the window's text joins the keys, in the same softmax
            kt, vt = attn.project_kv(h)
            kt = rope(kt, layout.pos, self.inv_freq)
            if cache is not None:
                kt, vt = cache.ca_text.write(self.layer_idx, kt, vt)
            k, v = torch.cat([k, kt], dim=2), torch.cat([v, vt], dim=2)
        return attn.attend(q, k, v, layout.ca_mask)


# -----------------------------------------------------------------------------
# Sampling: the next token from the last position's logits


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
# The model


class VLM(nn.Module):
    """The vision-language model. One calling convention for every variant:

        logits, loss = model(idx, images=None, targets=None, cache=None, image_index=None)

    idx (B, T) token ids with <|image|> markers; images (M, 3, H, W) floats in [0, 1], bound to the
    markers in reading order (row 0's markers first, left to right, then row 1, ...). image_index
    (M,) lets markers share images: marker m shows images[image_index[m]], and each of the K images
    is encoded once (training draws several questions about one picture: data.loader). logits are
    (B, T, vocab) at the text positions for every variant. targets (B, T), -1 where no loss.
    With cache=model.new_cache(B), the call appends idx (and its images) to the cache and returns
    logits for the new positions only.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.image_id = get_tokenizer().encode(IMAGE, allowed_special="all")[0]
        self.vision = VisionEncoder(config)
        self.compress = QueryCompressor(config) if config.compress_queries else None
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i, has_sa, has_ca) for i, (has_sa, has_ca) in enumerate(config.layer_kinds()))
        self.ln_f = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        # the text side: normal weights at config.init_std, by default 1/sqrt(n_embd) (0.088 at 128 wide;
        # GPT-2's 0.02 suits a 768-wide model: trained from scratch at 128, it learns question logic
        # several times slower, docs/recipe.md), residual projections scaled down as in GPT-2. The
        # vision encoder keeps PyTorch's default init (about 1/sqrt(fan_in)): it learns several times
        # faster with it than at std 0.02 (experiments/vision_probe.py); its conv stem He's if
        # config.stem_he_init (below)
        std = config.init_std or config.n_embd**-0.5
        for module in (self.wte, self.blocks, self.compress):
            if module is not None:
                module.apply(lambda m: self._init_weights(m, std))
        for name, p in self.named_parameters():  # scaled init of the residual projections (GPT-2)
            if name.endswith(("o.weight", "proj.weight")) and "vision" not in name:
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * config.n_layer))
        for block in self.blocks:
            block.init_ca_from_sa()
        if config.pos_std:  # last, so that every other weight starts as it would without it
            nn.init.normal_(self.vision.row_emb, std=config.pos_std)
            nn.init.normal_(self.vision.col_emb, std=config.pos_std)
        if config.stem_he_init:  # after that, for the same reason
            for conv in self.vision.stem:
                if isinstance(conv, nn.Conv2d):
                    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                    nn.init.zeros_(conv.bias)

    @staticmethod
    def _init_weights(module, std):
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx, images=None, targets=None, cache=None, image_index=None):
        config = self.config
        img = self.encode_images(idx, images, image_index)  # (M, N, C) or None
        if cache is not None and cache.batch_size != idx.size(0):
            raise ValueError(f"the cache was made for batch size {cache.batch_size}, idx has {idx.size(0)} rows")
        is_marker = idx == self.image_id  # (B, T)
        layout = make_layout(config, idx, is_marker, 0 if img is None else img.size(1), cache)
        x = self.wte(idx)  # (B, T, C)
        if cache is not None:  # room for the new K/V, in the dtype the projections will give
            kv_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            cache.begin(layout, kv_dtype)
        if config.insert_images:  # lay text and image tokens out in one stream (B, L, C)
            stream = x.new_zeros(*layout.pos.shape, x.size(-1))
            stream.scatter_(1, layout.text_idx[..., None].expand_as(x), x)
            if img is not None:
                stream[layout.is_image] = img.reshape(-1, img.size(-1)).to(stream.dtype)
            x, img = stream, None  # the image tokens now travel in the stream
        x = self.drop(x)
        for block in self.blocks:
            x, img = block(x, img, layout, cache)
        if config.insert_images:  # back to the text positions
            x = x.gather(1, layout.text_idx[..., None].expand(-1, -1, x.size(-1)))
        if cache is not None:
            cache.commit(layout)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def encode_images(self, idx, images, image_index=None):
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
        if image_index is not None:
            if images is None or image_index.dim() != 1 or image_index.dtype != torch.long:
                raise ValueError("image_index must be a 1-D long tensor, one entry per marker, with images given")
            if image_index.numel() and (int(image_index.min()) < 0 or int(image_index.max()) >= n_images):
                raise ValueError(f"image_index must lie in [0, {n_images}), the images given")
            n_images = image_index.numel()  # markers that get an image
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
        img = self.vision(images)  # (M, N, C), or (K, N, C) of K shared images
        img = img if self.compress is None else self.compress(img)  # (M or K, Q, C)
        return img if image_index is None else img[image_index]  # each marker its image: (M, N or Q, C)

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

    def new_cache(self, batch_size, capacity=None, sink_tokens=0, recent_tokens=None):
        """An empty KV cache for streaming (see Cache for the options)."""
        return Cache(self.config, batch_size, self.lm_head.weight.device, capacity, sink_tokens, recent_tokens)

    @torch.no_grad()
    def generate(self, idx, images=None, max_new_tokens=32, temperature=1.0, top_k=None, stop_token=None,
                 cache=None):
        """Sample up to max_new_tokens after idx (B, T); returns (B, T + new). temperature=0 is greedy.
        Every returned token is in the cache afterwards, so calling again with the same cache (and a
        new image) continues the conversation: that is streaming. Rows that emitted stop_token are
        padded with it until every row has stopped."""
        new = self.generate_tokens(idx, images, max_new_tokens, temperature, top_k, stop_token, cache)
        return torch.cat([idx, *new], dim=1)

    @torch.no_grad()
    def generate_tokens(self, idx, images=None, max_new_tokens=32, temperature=1.0, top_k=None, stop_token=None,
                        cache=None):
        """generate() one token at a time: yields each new token (B, 1) as soon as it is chosen, then
        feeds it to the cache when asked for the next. A live captioner can show (and time) the
        first token while the rest is still to come."""
        if cache is None:
            cache = self.new_cache(idx.size(0))
        logits, _ = self(idx, images, cache=cache)
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            last = logits[:, -1, :].clone()
            last[:, self.image_id] = float("-inf")  # images come from the caller, never sampled
            next_id = sample(last, temperature, top_k)  # (B, 1)
            if stop_token is not None:
                next_id = torch.where(done[:, None], stop_token, next_id)
                done |= next_id[:, 0] == stop_token
            yield next_id
            logits, _ = self(next_id, cache=cache)
            if stop_token is not None and bool(done.all()):
                return


# -----------------------------------------------------------------------------
# Training: the optimizer train.py uses for the weight matrices


@torch.no_grad()
def orthogonalize(G, steps=5):
    """G (A, B) -> about U V^T of G = U S V^T (every singular value pushed towards 1), by a quintic
    Newton-Schulz iteration (its coefficients from Jordan et al. 2024, tuned to push small singular
    values up fast; they end between about 0.7 and 1.2, which trains as well as exactly 1)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.float()
    tall = X.size(0) > X.size(1)
    if tall:  # work on the wide form: X @ X.T is then the small Gram matrix
        X = X.T
    X = X / (X.norm() + 1e-7)  # every singular value <= 1, where the iteration converges
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """Muon: SGD with Nesterov momentum whose update of each (A, B) weight matrix is orthogonalised,
    then scaled by 0.2 * sqrt(max(A, B)) to the size of an AdamW update (Liu et al. 2025, "Muon is
    scalable for LLM training"), so its lr reads like AdamW's. torch.optim.Muon computes the same in
    bfloat16, which CPUs without bfloat16 units run several times slower; this one is float32."""

    def __init__(self, params, lr, momentum=0.95):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = orthogonalize(p.grad.add(buf, alpha=group["momentum"]))  # Nesterov
                p.add_(update.to(p.dtype), alpha=-group["lr"] * 0.2 * max(p.shape) ** 0.5)


# -----------------------------------------------------------------------------
# Devices, prompts and checkpoints: the small conventions train.py, sample.py and stream.py share


def pick_device(name="auto"):
    """The device train.py, sample.py and stream.py run on: 'auto' is CUDA if there is one, then
    Apple's MPS, then the CPU; any other name must be a device torch knows and this machine has
    (ValueError with the fix otherwise, before any work is done)."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        kind = torch.device(name).type
        index = torch.device(name).index
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}, but torch sees no CUDA GPU here: use --device=cpu (or auto)")
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}, but this machine has {torch.cuda.device_count()} CUDA GPU(s): "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}, but Apple's MPS is not available here: use --device=cpu (or auto)")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not supported here: use auto, cpu, cuda, cuda:N or mps")
    return name


def pick_threads(requested=0):
    """CPU threads for torch: `requested` when > 0, else the cores that are idle now (the cores this
    process may use, less the 1-minute load average; at least 1). Threads that outnumber the idle
    cores wait on each other: on 2 cores beside one busy job, 2 threads run many times slower than 1.
    Returns (threads, why) so a script can print what it chose."""
    if requested > 0:
        return requested, "--threads"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every system (Windows)
        return cores, f"{cores} cores"
    n = max(1, min(cores, cores - round(load)))
    return n, f"{cores} cores, load {load:.1f}"


def encode_turn(tokenizer, prompt, answer=None):
    """Token ids of one conversation turn: prompt, <|answer|>, then (when given) the answer and
    <|endoftext|>. Returns (ids, n_prompt): the loss goes on ids[n_prompt:], the answer and its end."""
    ids = tokenizer.encode(prompt, allowed_special={IMAGE}) + tokenizer.encode(ANSWER, allowed_special={ANSWER})
    n_prompt = len(ids)
    if answer is not None:
        ids += tokenizer.encode(answer, disallowed_special=()) + tokenizer.encode(ENDOFTEXT, allowed_special={ENDOFTEXT})
    return ids, n_prompt


def save_checkpoint(path, model, **extra):
    """Write {'model': state_dict, 'config': dict, **extra} atomically: a temporary file in the same
    folder, then a rename, so an interrupted save never leaves a broken checkpoint behind. A failed
    save (an error, Ctrl-C, SIGTERM) removes its temporary file; a full disk raises OSError(ENOSPC)
    that says so (torch reports it as a RuntimeError, 'basic_ios::clear: iostream error')."""
    import dataclasses
    import errno
    import shutil

    raw = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    ckpt = {"model": raw.state_dict(), "config": dataclasses.asdict(raw.config), **extra}
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        full = getattr(e, "errno", None) == errno.ENOSPC or (
            isinstance(e, RuntimeError) and shutil.disk_usage(folder).free < 2**20)  # measured with tmp still there
        if os.path.exists(tmp):
            os.remove(tmp)
        if full:
            why = f"no space left on device: {path} not written (free space in {folder})"
            raise OSError(errno.ENOSPC, why) from None
        raise


# The largest sizes a checkpoint's config may name: far above anything trained here, small enough
# that a damaged or foreign config cannot make load_checkpoint build a model without bound.
CHECKPOINT_LIMITS = dict(block_size=1 << 20, vocab_size=1 << 20, n_layer=1024, n_head=1024, n_embd=1 << 16,
                         image_size=1 << 14, patch_size=1 << 14, n_vis_layer=1024, n_vis_head=1024, n_vis_embd=1 << 16,
                         ca_every=1024, compress_queries=1 << 14)


def checkpoint_config(saved):
    """A checkpoint's config as Config's keywords: settings added since it was saved take the value
    that reproduces the model it was saved from (not today's default)."""
    return {"stem_norm": False, "pos_std": 0.0, **saved}


def load_checkpoint(path, device="cpu"):
    """Rebuild the model a checkpoint was saved from. Returns (model, checkpoint dict).
    Loads with weights_only=True: a checkpoint holds tensors and plain Python values only. Its config
    is checked before any model is built: sizes within CHECKPOINT_LIMITS, and the sizes of the
    weights in the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (train one with: python train.py --out_dir=...)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # not a torch file at all (text, empty, truncated, foreign pickle)
        raise ValueError(f"{path} is not a casa checkpoint: torch.load (weights_only=True) cannot read it "
                         f"({type(e).__name__})") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and isinstance(ckpt.get("config"), dict)):
        raise ValueError(f"{path} is not a casa checkpoint (expected keys 'model' and 'config')")
    for k, most in CHECKPOINT_LIMITS.items():
        least = 0 if k == "compress_queries" else 1  # 0: no compression
        v = ckpt["config"].get(k, least)
        if type(v) is not int or not least <= v <= most:
            raise ValueError(f"{path}: its config has {k}={v!r}, not a size from {least} to {most}: a damaged or "
                             "foreign checkpoint")
    try:
        config = Config(**checkpoint_config(ckpt["config"]))
    except TypeError as e:
        raise ValueError(f"{path} was saved with a config this casa.py does not know: {e}") from None
    except ValueError as e:  # sizes that do not fit together, an unknown variant
        raise ValueError(f"{path}: {e}") from None
    # the config's sizes against the weights', before a model is built: then a damaged config cannot
    # make the model larger than the weights in the file (load_state_dict checks every tensor after)
    c, weights = config, ckpt["model"]
    shapes = {"wte.weight": (c.vocab_size, c.n_embd), "vision.proj.weight": (c.n_embd, c.n_vis_embd),
              "vision.row_emb": (c.image_size // c.patch_size, 1, c.n_vis_embd)}
    for k, want in shapes.items():
        got = tuple(getattr(weights.get(k), "shape", ()))
        if got != want:
            raise RuntimeError(f"{path}: size mismatch between its config and its weights: {k} is {got} in the "
                               f"file, {want} by the config")
    for prefix, name in (("blocks.", "n_layer"), ("vision.blocks.", "n_vis_layer")):
        got = len({str(k)[len(prefix):].split(".")[0] for k in weights if str(k).startswith(prefix)})
        if got != getattr(c, name):
            raise RuntimeError(f"{path}: size mismatch between its config and its weights: {name}="
                               f"{getattr(c, name)} by the config, {got} {prefix[:-1]} in the file")
    model = VLM(config)
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


# -----------------------------------------------------------------------------
# Analysis: what each variant caches, weighs, computes, and where its attention goes


def kv_formula(config):
    """The paper's #KV column for this variant (k turns, T text tokens and one N-token image each)."""
    if config.keeps_every_frame:
        return "kT + kQ" if config.compress_queries else "kT + kN"
    if config.ca_replaces_sa:
        return "kT (SA layers) or N (CA layers)"
    return "kT + (T + N)" if config.ca_text_keys else "kT + N"


def kv_cache_entries(config, turns, text_tokens, image_tokens=None, sink_tokens=0, recent_tokens=None):
    """Analytic cached entries per layer of each kind after `turns` turns, each turn one image of
    N tokens (default: config.tokens_per_image, Q with compressed insertion) and T text tokens (its <|image|> marker included).
    With recent_tokens (a bounded cache, see Cache) self-attention keeps at most sink + recent
    (insertion's image tokens included)."""
    k, T = turns, text_tokens
    N = config.tokens_per_image if image_tokens is None else image_tokens
    has_ca = config.layer_counts()[1] > 0
    sa = k * (T + N) if config.insert_images else k * T  # the text, and insertion's image tokens
    return {
        "self_attn": sa if recent_tokens is None else min(sa, sink_tokens + recent_tokens),
        # only the current window's image; with D5 every image so far
        "cross_attn_image": (k * N if config.ca_all_images else N) if k > 0 and has_ca else 0,
        "cross_attn_text": T if k > 0 and config.ca_text_keys else 0,  # only the current window's text
    }


def kv_cache_bytes(config, turns, text_tokens, image_tokens=None, batch_size=1, bytes_per_value=4, sink_tokens=0,
                   recent_tokens=None):
    """Analytic KV-cache bytes (keys and values, every layer) after `turns` turns: the formula that
    Cache.nbytes() measures. bytes_per_value: 4 for float32, 2 for bf16."""
    e = kv_cache_entries(config, turns, text_tokens, image_tokens, sink_tokens, recent_tokens)
    n_sa, n_ca = config.layer_counts()
    per_entry = 2 * config.n_embd * bytes_per_value  # K and V, all heads
    entries = n_sa * e["self_attn"] + n_ca * (e["cross_attn_image"] + e["cross_attn_text"])
    return batch_size * entries * per_entry


def is_fusion_param(name):
    """Whether a parameter belongs to the fusion (a CA layer's projections or norm, or the compressor)."""
    return ".ca." in name or ".ln_ca." in name or name.startswith("compress.")


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
    Q = config.compress_queries or N  # an image's tokens in insertion's stream (Q when compressed)
    proj, mlp = 2 * 4 * C * C, 2 * 8 * C * C  # q, k, v, o; fc + proj

    def causal(n):  # sum over n causal queries of the keys they see
        return n * (n + 1) // 2

    linear = attention = 0
    if config.insert_images:  # the stream holds T + Q tokens; every one goes through every layer
        linear = config.n_layer * (T + Q) * (proj + mlp)
        attention = config.n_layer * 4 * C * causal(T + Q)
        if config.compress_queries:  # the compressor, once per image: q, o and the MLP on Q queries, k, v on N
            linear += Q * (2 * 2 * C * C + mlp) + N * 2 * 2 * C * C
            attention += 4 * C * Q * N
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
            if config.ca_image_ffn:  # D4: the image tokens go through every block's MLP, CA or not
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
    rest goes to text keys. Returns a (n_layers, n_head) tensor; rows follow the layers in order.

    One forward pass (no cache) with each such layer's attend() swapped, for this call only, for a
    copy that computes the same result by an explicit softmax and keeps the probabilities."""
    config = model.config
    if config.insert_images:
        attns = [b.sa for b in model.blocks]
    elif config.ca_text_keys:
        attns = [b.ca for b in model.blocks if b.has_ca]
    else:
        raise ValueError(f"variant {config.variant!r} never puts text and image keys in one softmax; "
                         "attention_mass is defined for 'ca_tv' and 'insertion'")
    records = {}  # attention layer -> (probs (B, H, Tq, Tk), mask (B, Tq, Tk))

    def recording(a):
        def attend_and_record(q, k, v, mask):
            Tq, Tk = q.size(2), k.size(2)
            if mask is None:
                mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()[None]
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
            probs = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
            records[a] = (probs, mask)
            return probs @ v
        return attend_and_record

    for a in attns:
        a.attend = recording(a)  # an instance attribute: shadows the method
    try:
        model(idx, images)
    finally:
        for a in attns:
            del a.attend
    shares = []
    for a in attns:
        probs, mask = records[a]
        B, H, Tq, Tk = probs.shape
        if config.insert_images:  # the keys are the stream: its image tokens, from the call's layout
            n_image_tokens = config.tokens_per_image if images is not None else 0
            key_is_image = make_layout(config, idx, idx == model.image_id, n_image_tokens, None).is_image
        else:  # ca_tv's keys: the window's image slots, then its Tq text tokens
            key_is_image = (torch.arange(Tk, device=probs.device) < Tk - Tq).expand(B, Tk)
        sees_image = (mask & key_is_image[:, None, :]).any(-1)  # (B, Tq)
        if config.insert_images:  # queries are the stream: keep real text tokens only
            is_self = torch.eye(Tq, dtype=torch.bool, device=mask.device)[None]
            sees_image &= ~key_is_image & (mask & is_self).any(-1)
        to_image = (probs * key_is_image[:, None, None, :]).sum(-1)  # (B, H, Tq)
        w = sees_image[:, None, :].float()
        shares.append((to_image * w).sum((0, 2)) / w.sum((0, 2)).clamp(min=1))
    return torch.stack(shares)
