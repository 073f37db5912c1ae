"""Tests of casa.py against independent references: a naive, loop-by-loop reimplementation of every
fusion variant (windows, cross-attention, CA^{t+v}, token insertion), full forwards instead of the
cache, finite differences for gradients, torch's FLOP counter, and hand-counted cache sizes.

Tiny configs on CPU; the whole file runs in seconds. Run: python -m pytest tests/test_model.py -q
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import casa

VARIANTS = list(casa.VARIANTS)
CA_VARIANTS = [v for v in VARIANTS if not casa.VARIANTS[v]["insert_images"]]
# the paper's Table 5 models: CA in every n-th block only, and compressed insertion (Q tokens an image)
TABLE5 = [("ca_tv", dict(ca_every=2)), ("ca", dict(ca_every=3)), ("ca_shared", dict(ca_every=2)),
          ("ca_ffn", dict(ca_every=2)), ("insertion", dict(compress_queries=3))]
ALL_MODELS = [(v, {}) for v in VARIANTS] + TABLE5  # (variant, Config settings)
MODEL_IDS = [v + "".join(f"-{k}={x}" for k, x in kw.items()) for v, kw in ALL_MODELS]
IMAGE_ID = 257  # <|image|>, checked against the tokenizer in test_tokenizer_bytes_round_trip_and_specials
# float64 model vs float64 naive reference. Not 1e-12: casa computes RoPE's inverse frequencies in
# float32 (rope_inv_freq) before the model is cast, the reference in float64, a ~1e-8 difference in
# angles. A wrong key, mask, window or position shows up at 1e-2 or more.
REF_TOL = dict(atol=1e-6, rtol=1e-6)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is much faster than several (and than fighting other processes for
    the cores); restored afterwards for other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -----------------------------------------------------------------------------
# Tiny models and inputs


def make_config(variant, **kw):
    base = dict(n_layer=4, n_head=2, n_embd=32, block_size=64, image_size=16, patch_size=4,
                n_vis_layer=1, n_vis_head=2, n_vis_embd=32, variant=variant)
    base.update(kw)
    return casa.Config(**base)


def make_model(variant, seed=0, dtype=torch.float32, **kw):
    """A tiny model whose weights are re-drawn so that every part matters at O(1) scale: the GPT-2
    init makes residual branches tiny, and CA starts as a copy of SA, so a CA that used SA's
    weights (or a branch that was skipped) would hide under the tolerance. Here CA != SA."""
    torch.manual_seed(seed)
    model = casa.VLM(make_config(variant, **kw))
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "lm_head.weight":  # tied with wte
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif p.dim() == 1 and name.endswith("weight"):  # norm scales
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() in (2, 4):  # linear / conv weights: unit-scale outputs
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            else:  # row / column position embeddings
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model.to(dtype).eval()


def rand_text(n, gen):
    return torch.randint(0, 256, (n,), generator=gen).tolist()


def two_row_batch(seed=0, dtype=torch.float32, image_size=16):
    """Batch of 2 rows, T=18, text before the first image in both rows, several images, markers at
    different positions and in different numbers: row 0 at 3, 8, 12; row 1 at 5, 13.
    Images (5, 3, S, S) bound in reading order: row 0's three, then row 1's two."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 256, (2, 18), generator=g)
    idx[0, [3, 8, 12]] = IMAGE_ID
    idx[1, [5, 13]] = IMAGE_ID
    images = torch.rand(5, 3, image_size, image_size, generator=g).to(dtype)
    return idx, images


def images_for(idx, images, a, b):
    """Images of the markers in idx[:, a:b], in reading order (row 0's first, then row 1's)."""
    is_marker = idx == IMAGE_ID
    order = torch.full(idx.shape, -1, dtype=torch.long)
    order[is_marker] = torch.arange(int(is_marker.sum()))  # global reading order, row-major
    sel = order[:, a:b][is_marker[:, a:b]]  # row 0's markers in the chunk first, then row 1's
    return images[sel] if sel.numel() else None


# -----------------------------------------------------------------------------
# Naive reference: one row at a time, one query at a time, explicit keys and softmax.


def ref_rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def ref_linear(x, lin):
    y = x @ lin.weight.T
    return y if lin.bias is None else y + lin.bias


def ref_mlp(x, mlp):
    h = ref_linear(x, mlp.fc)
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    return ref_linear(h, mlp.proj)


def ref_rope(x, pos, theta):
    """x (P, H, D) rotated at integer positions pos (P,): pair (i, i + D/2) turns by
    pos * theta^(-2i/D) (the half-split convention of casa.rope). Angles in float64."""
    D = x.size(-1)
    half = D // 2
    i = torch.arange(half, dtype=torch.float64)
    ang = torch.as_tensor(pos, dtype=torch.float64)[:, None, None] * theta ** (-2 * i / D)
    c, s = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * c - b * s, a * s + b * c], dim=-1)


KEYS_SEEN = []  # when non-empty, ref_softmax_attention adds the number of keys it used to [-1]


def ref_softmax_attention(q, k, v):
    """One query q (H, D) over explicit keys k, v (S, H, D): (output (H, D), probs (H, S))."""
    if KEYS_SEEN:
        KEYS_SEEN[-1] += k.size(0)
    scores = torch.einsum("hd,shd->hs", q, k) / math.sqrt(q.size(-1))
    p = scores.softmax(-1)
    return torch.einsum("hs,shd->hd", p, v), p


def ref_kv(h, attn, n_head):
    C = h.size(-1)
    Wk, Wv = attn.kv.weight[:C], attn.kv.weight[C:]
    k, v = h @ Wk.T, h @ Wv.T
    if attn.kv.bias is not None:
        k, v = k + attn.kv.bias[:C], v + attn.kv.bias[C:]
    return k.view(-1, n_head, C // n_head), v.view(-1, n_head, C // n_head)


def ref_cross_attention(x, imgs, marker_pos, ln_w, attn, n_head, theta, text_keys, q_raw=None, record=None,
                        all_images=False):
    """The CA branch of one block for one row, by an explicit loop over queries and windows.
    x (T, C) the row's hidden states; imgs: the row's image tokens, one (N, C) per marker, in order;
    marker_pos: the markers' positions. Window w >= 1 runs from the w-th marker to the next one.
    - vanilla CA: a query in window w >= 1 attends to image w's keys only; window 0 (text before
      the first image) gets 0.
    - CA^{t+v} (text_keys): keys are image w (rotated to its marker's position) and the window's
      text up to the query (rotated to their positions), one softmax; q rotated to its position.
      Window 0 has no image; its text still attends to window 0's text (casa's convention since
      commit 907479e: the CA^{t+v} layer is insertion's SA restricted to the window).
    - all_images (D5, ca_all): a query in window w attends to images 1..w, in one softmax.
    q_raw: (T, H, D) query given from outside (ca_shared: SA's unrotated q).
    Returns (T, H, D) before the output projection."""
    T, C = x.shape
    D = C // n_head
    h = ref_rms(x, ln_w)
    q = q_raw if q_raw is not None else ref_linear(h, attn.q).view(T, n_head, D)
    if text_keys and q_raw is None:
        q = ref_rope(q, list(range(T)), theta)
    kt, vt = ref_kv(h, attn, n_head)
    if text_keys:
        kt = ref_rope(kt, list(range(T)), theta)
    y = torch.zeros(T, n_head, D, dtype=x.dtype)
    for t in range(T):
        w = sum(1 for p in marker_pos if p <= t)  # this query's window
        keys, vals, n_img = [], [], 0
        for i in (range(1, w + 1) if all_images else [w] if w > 0 else []):
            ki, vi = ref_kv(ref_rms(imgs[i - 1], ln_w), attn, n_head)
            if text_keys:
                ki = ref_rope(ki, [marker_pos[i - 1]] * ki.size(0), theta)
            keys.append(ki)
            vals.append(vi)
            n_img += ki.size(0)
        if text_keys:
            s0 = marker_pos[w - 1] if w > 0 else 0
            keys.append(kt[s0 : t + 1])
            vals.append(vt[s0 : t + 1])
        if not keys:
            continue  # text before the first image: zero CA output
        y[t], p = ref_softmax_attention(q[t], torch.cat(keys), torch.cat(vals))
        if record is not None and n_img:
            record.append(p[:, :n_img].sum(-1))  # (H,) share of attention on image keys
    return y


def ref_self_attention(x, ln_w, attn, n_head, theta, pos, is_image=None, record=None, visible=None):
    """Causal SA over the row's sequence x (L, C) (for insertion: the mixed stream), RoPE at pos.
    visible(t): the keys query t sees (default: 0..t, causal). Returns (L, H, D) before the output
    projection, and the unrotated q."""
    L, C = x.shape
    D = C // n_head
    h = ref_rms(x, ln_w)
    q_raw = ref_linear(h, attn.q).view(L, n_head, D)
    k, v = ref_kv(h, attn, n_head)
    q, k = ref_rope(q_raw, pos, theta), ref_rope(k, pos, theta)
    y = torch.zeros(L, n_head, D, dtype=x.dtype)
    for t in range(L):
        if visible is not None:
            keys = visible(t)
            y[t], _ = ref_softmax_attention(q[t], k[keys], v[keys])
            continue
        y[t], p = ref_softmax_attention(q[t], k[: t + 1], v[: t + 1])
        if record is not None and not is_image[t] and any(is_image[: t + 1]):
            record.append(p[:, torch.tensor(is_image[: t + 1])].sum(-1))
    return y, q_raw


def ref_merge(y, lin):  # (T, H, D) -> (T, C) through the output projection
    return ref_linear(y.reshape(y.size(0), -1), lin)


def ref_compress(comp, img, n_head):
    """Compressed insertion's block on one image's tokens (N, C) -> (Q, C), one query at a time:
    each learned query attends to all N tokens, then the MLP and the output norm."""
    x = comp.queries
    Q, C = x.shape
    q = ref_linear(ref_rms(x, comp.ln_q.weight), comp.attn.q).view(Q, n_head, C // n_head)
    k, v = ref_kv(ref_rms(img, comp.ln_img.weight), comp.attn, n_head)
    y = torch.stack([ref_softmax_attention(q[j], k, v)[0] for j in range(Q)])
    x = x + ref_merge(y, comp.attn.o)
    x = x + ref_mlp(ref_rms(x, comp.ln_mlp.weight), comp.mlp)
    return ref_rms(x, comp.ln_out.weight)


def reference_forward(model, idx, images, records=None, sa_visible=None):
    """Logits (B, T, vocab) of the whole model, one row at a time, from the model's weights only.
    The image tokens come from model.vision (the encoder itself is not what is tested here).
    records: if a dict, records[layer] collects per-query image-attention shares (H,) for the
    layers with a mixed softmax (ca_tv CA layers, insertion SA layers).
    sa_visible(t): the keys query t sees in self-attention (default causal): text keys for the CA
    variants, stream keys (text and image tokens) for insertion."""
    cfg = model.config
    H, theta, N = cfg.n_head, cfg.rope_theta, cfg.tokens_per_image
    img_tokens = model.vision(images) if images is not None else None
    if img_tokens is not None and cfg.compress_queries:
        img_tokens = torch.stack([ref_compress(model.compress, im, H) for im in img_tokens])
    out, m = [], 0
    for b in range(idx.size(0)):
        row = idx[b].tolist()
        marker_pos = [t for t, tok in enumerate(row) if tok == IMAGE_ID]
        imgs = [img_tokens[m + j] for j in range(len(marker_pos))]
        m += len(marker_pos)
        if cfg.insert_images:
            stream, is_image, text_slot = [], [], []
            for t, tok in enumerate(row):
                text_slot.append(len(stream))
                stream.append(model.wte.weight[tok])
                is_image.append(False)
                if tok == IMAGE_ID:
                    img = imgs[marker_pos.index(t)]
                    stream.extend(img.unbind(0))
                    is_image.extend([True] * N)
            x = torch.stack(stream)
            pos = list(range(x.size(0)))
            for li, block in enumerate(model.blocks):
                rec = records.setdefault(li, []) if records is not None else None
                y, _ = ref_self_attention(x, block.ln_sa.weight, block.sa, H, theta, pos, is_image, rec, sa_visible)
                x = x + ref_merge(y, block.sa.o)
                x = x + ref_mlp(ref_rms(x, block.ln_mlp.weight), block.mlp)
            x = x[text_slot]
        else:
            x = model.wte.weight[row]
            T = len(row)
            for li, block in enumerate(model.blocks):
                rec = records.setdefault(li, []) if records is not None and cfg.ca_text_keys else None
                out_b = torch.zeros_like(x)
                y_sa = q_raw = None
                if block.has_sa:
                    y_sa, q_raw = ref_self_attention(x, block.ln_sa.weight, block.sa, H, theta, list(range(T)),
                                                     visible=sa_visible)
                if block.has_ca:
                    if cfg.ca_shared:
                        y_ca = ref_cross_attention(x, imgs, marker_pos, block.ln_sa.weight, block.sa, H, theta,
                                                   False, q_raw=q_raw)
                        out_b = ref_merge(y_sa + y_ca, block.sa.o)  # o applied once, to the sum
                    else:
                        y_ca = ref_cross_attention(x, imgs, marker_pos, block.ln_ca.weight, block.ca, H, theta,
                                                   cfg.ca_text_keys, record=rec, all_images=cfg.ca_all_images)
                        out_b = ref_merge(y_ca, block.ca.o)
                        if y_sa is not None:
                            out_b = out_b + ref_merge(y_sa, block.sa.o)
                else:
                    out_b = ref_merge(y_sa, block.sa.o)
                x = x + out_b
                x = x + ref_mlp(ref_rms(x, block.ln_mlp.weight), block.mlp)
                if cfg.ca_image_ffn:  # D4: the images go through the block's MLP too
                    imgs = [im + ref_mlp(ref_rms(im, block.ln_mlp.weight), block.mlp) for im in imgs]
        out.append(ref_rms(x, model.ln_f.weight) @ model.wte.weight.T)
    return torch.stack(out)


# -----------------------------------------------------------------------------
# 1. Cached decoding equals one full forward


CHUNKINGS = {
    "one_token_at_a_time": list(range(19)),
    # chunk [4, 9) holds row 1's marker (t=5) before row 0's (t=8): images still bind row 0 first;
    # [13, 14) holds a marker of row 1 only; [2, 4) ends on a marker
    "uneven_chunks": [0, 2, 4, 9, 13, 14, 18],
}


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("variant, settings", ALL_MODELS, ids=MODEL_IDS)
def test_cached_decoding_equals_full_forward(variant, settings, chunking):
    model = make_model(variant, **settings)
    idx, images = two_row_batch()
    with torch.no_grad():
        full, _ = model(idx, images)
        cache = model.new_cache(2)
        parts = []
        bounds = CHUNKINGS[chunking]
        for a, b in zip(bounds[:-1], bounds[1:]):
            logits, _ = model(idx[:, a:b], images_for(idx, images, a, b), cache=cache)
            assert logits.shape == (2, b - a, model.config.vocab_size)
            parts.append(logits)
    cached = torch.cat(parts, dim=1)
    assert full.abs().max() > 0.5  # the comparison is at a meaningful scale
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


BOUNDED = dict(sink_tokens=2, recent_tokens=4)


@pytest.mark.parametrize("variant", [v for v in CA_VARIANTS if v != "ca_all"])
def test_bounded_cache_equals_full_forward_with_its_mask(variant):
    """A cache that keeps the first S and the last W text tokens (StreamingLLM) equals a full forward
    whose self-attention mask is that eviction spelled out: query t of the call starting at a sees
    tokens j < S, a - W <= j < a, and a <= j <= t. CA keys are unchanged (one image a window)."""
    model = make_model(variant, dtype=torch.float64)
    idx, images = two_row_batch(dtype=torch.float64)
    S, W = BOUNDED["sink_tokens"], BOUNDED["recent_tokens"]
    bounds = CHUNKINGS["uneven_chunks"]
    with torch.no_grad():
        cache = model.new_cache(2, **BOUNDED)
        got = torch.cat([model(idx[:, a:b], images_for(idx, images, a, b), cache=cache)[0]
                         for a, b in zip(bounds[:-1], bounds[1:])], dim=1)

        def visible(t):
            a = max(x for x in bounds if x <= t)  # start of the call holding query t
            return [j for j in range(t + 1) if j < S or j >= a - W]

        want = reference_forward(model, idx, images, sa_visible=visible)
        plain = reference_forward(model, idx, images)
    torch.testing.assert_close(got, want, **REF_TOL)
    assert (want - plain).abs().max() > 1e-3  # the eviction really changed the answer
    # what stays: S + W text tokens a row, and exactly one image (ca_tv: its window text too)
    assert cache.entries()["self_attn"] == 2 * (S + W)


@pytest.mark.parametrize("settings", [{}, {"compress_queries": 2}], ids=["insertion", "compressed"])
def test_insertion_window_equals_full_forward_with_its_mask(settings):
    """Insertion's bounded cache slides over frames and text alike (old frames are dropped): it equals
    a full forward whose self-attention mask spells the eviction out in stream indices: query t of
    the call starting at stream index a sees j < S, a - W <= j < a, and a <= j <= t."""
    model = make_model("insertion", dtype=torch.float64, **settings)
    idx, images = two_row_batch(dtype=torch.float64)
    idx, images = idx[:1], images[:3]  # row 0: markers at 3, 8, 12, so its three images
    N, (S, W) = model.config.tokens_per_image, (2, 5)  # a window shorter than one image
    width = [1 + N * (t == IMAGE_ID) for t in idx[0].tolist()]  # stream slots each text token opens
    stream_start = [sum(width[:a]) for a in range(len(width) + 1)]
    bounds = CHUNKINGS["uneven_chunks"]
    with torch.no_grad():
        cache = model.new_cache(1, sink_tokens=S, recent_tokens=W)
        got = torch.cat([model(idx[:, a:b], images_for(idx, images, a, b), cache=cache)[0]
                         for a, b in zip(bounds[:-1], bounds[1:])], dim=1)

        def visible(t):  # t, j: stream indices
            a = max(stream_start[x] for x in bounds if stream_start[x] <= t)
            return [j for j in range(t + 1) if j < S or j >= a - W]

        want = reference_forward(model, idx, images, sa_visible=visible)
        plain = reference_forward(model, idx, images)
    torch.testing.assert_close(got, want, **REF_TOL)
    assert (want - plain).abs().max() > 1e-3  # the eviction really changed the answer
    assert cache.entries()["self_attn"] == S + W


@pytest.mark.parametrize("variant", ["ca", "ca_tv", "ca_replace", "insertion"])
def test_bounded_cache_size_follows_the_formula(variant):
    """Turn by turn, a bounded cache holds min(k (T [+ N]), S + W) entries a self-attention layer
    (then stays flat; insertion's image tokens count too), as kv_cache_entries / kv_cache_bytes say;
    the unbounded formula is the same with recent_tokens=None."""
    model = make_model(variant)
    T = 6
    per_turn = T + (model.config.n_image_tokens if model.config.insert_images else 0)
    S, W = 3, int(2.5 * per_turn) - 3  # full after 2.5 turns
    g = torch.Generator().manual_seed(4)
    cache = model.new_cache(1, sink_tokens=S, recent_tokens=W)
    sizes = []
    with torch.no_grad():
        for k in range(1, 6):
            model(torch.tensor([[IMAGE_ID] + rand_text(T - 1, g)]), torch.rand(1, 3, 16, 16, generator=g), cache=cache)
            want = casa.kv_cache_entries(model.config, k, T, sink_tokens=S, recent_tokens=W)
            assert cache.entries() == want and want["self_attn"] == min(k * per_turn, S + W)
            assert cache.nbytes() == casa.kv_cache_bytes(model.config, k, T, sink_tokens=S, recent_tokens=W)
            sizes.append(cache.nbytes())
    assert sizes[1] < sizes[2] == sizes[3] == sizes[4]  # flat from turn (S + W) / T on


def test_bounded_cache_refuses_ca_all():
    with pytest.raises(ValueError, match="keeps every frame's image tokens in its CA layers"):
        make_model("ca_all").new_cache(1, **BOUNDED)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reserved_capacity_never_grows_and_changes_nothing(variant):
    """With capacity from kv_cache_entries for the whole session, no store reallocates (no stall),
    and every logit equals the growing cache's."""
    model = make_model(variant)
    N, T, turns = model.config.n_image_tokens, 6, 5
    g = torch.Generator().manual_seed(3)
    capacity = casa.kv_cache_entries(model.config, turns, T)
    reserved, growing = model.new_cache(1, capacity=capacity), model.new_cache(1)
    stores = lambda c: (c.sa, c.ca_image, c.ca_text)  # noqa: E731
    with torch.no_grad():
        for turn in range(turns):
            idx = torch.tensor([[IMAGE_ID] + rand_text(T - 1, g)])
            img = torch.rand(1, 3, 16, 16, generator=g)
            a, _ = model(idx, img, cache=reserved)
            b, _ = model(idx, img, cache=growing)
            assert torch.equal(a, b)
            if turn == 0:
                first = [{i: t.data_ptr() for i, t in s.k.items()} for s in stores(reserved)]
            assert [{i: t.data_ptr() for i, t in s.k.items()} for s in stores(reserved)] == first
    assert any(s.allocated_bytes() for s in stores(reserved))


# -----------------------------------------------------------------------------
# 2. The CA / CA^{t+v} branch, and whole models, against the naive reference


@pytest.mark.parametrize("variant", CA_VARIANTS)
def test_cross_attend_matches_naive_windows(variant):
    """Block.cross_attend (B, H, T, D) on random hidden states equals the explicit loop over windows."""
    model = make_model(variant, dtype=torch.float64)
    cfg = model.config
    idx, images = two_row_batch(dtype=torch.float64)
    li = 1  # has CA in every CA variant (ca_replace: odd layers)
    block = model.blocks[li]
    assert block.has_ca
    torch.manual_seed(1)
    x = torch.randn(2, idx.size(1), cfg.n_embd, dtype=torch.float64)
    with torch.no_grad():
        img = model.vision(images)
        layout = casa.make_layout(cfg, idx, idx == model.image_id, img.size(1), cache=None)
        q = None
        if cfg.ca_shared:  # the model hands CA the SA's unrotated query
            q = block.sa.project_q(block.ln_sa(x))
        got = block.cross_attend(x, img, layout, None, q=q)
        m = 0
        for b in range(2):
            marker_pos = [t for t, tok in enumerate(idx[b].tolist()) if tok == IMAGE_ID]
            imgs = [img[m + j] for j in range(len(marker_pos))]
            m += len(marker_pos)
            ln, attn = (block.ln_sa, block.sa) if cfg.ca_shared else (block.ln_ca, block.ca)
            want = ref_cross_attention(x[b], imgs, marker_pos, ln.weight, attn, cfg.n_head, cfg.rope_theta,
                                       cfg.ca_text_keys, q_raw=None if q is None else q[b].transpose(0, 1),
                                       all_images=cfg.ca_all_images)
            torch.testing.assert_close(got[b].transpose(0, 1), want, **REF_TOL)
            if not cfg.ca_text_keys:  # text before the first image: exactly zero CA output
                assert got[b, :, : marker_pos[0]].abs().max() == 0
            else:
                assert got[b, :, : marker_pos[0]].abs().max() > 0.1


@pytest.mark.parametrize("variant, settings", ALL_MODELS, ids=MODEL_IDS)
def test_model_matches_naive_reference(variant, settings):
    """Whole forward (SA, CA, MLP, image FFN, insertion's mixed-stream causal SA and its gather back
    to text positions; Table 5's CA every n-th block and compressed insertion) equals the
    one-row-at-a-time naive reference, float64."""
    model = make_model(variant, dtype=torch.float64, **settings)
    idx, images = two_row_batch(dtype=torch.float64)
    with torch.no_grad():
        got, _ = model(idx, images)
        want = reference_forward(model, idx, images)
    torch.testing.assert_close(got, want, **REF_TOL)


def test_insertion_block_sa_matches_naive_mixed_stream():
    """One insertion Block on the padded mixed stream: its output equals x + naive causal SA +
    MLP for each row's own stream (the shorter row's padding must not matter)."""
    model = make_model("insertion", dtype=torch.float64)
    cfg = model.config
    N = cfg.n_image_tokens
    idx, images = two_row_batch(dtype=torch.float64)
    block = model.blocks[2]
    with torch.no_grad():
        img = model.vision(images)
        layout = casa.make_layout(cfg, idx, idx == model.image_id, img.size(1), cache=None)
        torch.manual_seed(2)
        L = layout.pos.size(1)
        x = torch.randn(2, L, cfg.n_embd, dtype=torch.float64)
        got, _ = block(x, None, layout)  # insertion: the image tokens are in the stream x
        for b, n_img in ((0, 3), (1, 2)):
            Lb = idx.size(1) + n_img * N  # this row's stream length
            is_image = (~torch.isin(torch.arange(Lb), layout.text_idx[b])).tolist()
            assert sum(is_image) == n_img * N
            y, _ = ref_self_attention(x[b, :Lb], block.ln_sa.weight, block.sa, cfg.n_head, cfg.rope_theta,
                                      list(range(Lb)))
            want = x[b, :Lb] + ref_merge(y, block.sa.o)
            want = want + ref_mlp(ref_rms(want, block.ln_mlp.weight), block.mlp)
            torch.testing.assert_close(got[b, :Lb], want, **REF_TOL)
    # the layout, counted by hand: each marker is followed by its N image slots
    for b in range(2):
        slot, want = 0, []
        for tok in idx[b].tolist():
            want.append(slot)
            slot += 1 + (N if tok == IMAGE_ID else 0)
        assert layout.text_idx[b].tolist() == want


# -----------------------------------------------------------------------------
# 3. Text before an image is unaffected by it


@pytest.mark.parametrize("variant", VARIANTS)
def test_text_before_an_image_is_unaffected_by_it(variant):
    model = make_model(variant)
    idx, images = two_row_batch()
    with torch.no_grad():
        base, _ = model(idx, images)
        # row 0's second image (marker at 8) replaced
        changed = images.clone()
        changed[1] = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(9))
        new, _ = model(idx, changed)
        assert torch.equal(new[0, :8], base[0, :8])  # before the marker: bit-identical
        # the marker itself: in CA variants it is its window's first token (the gist) and sees the
        # image; in insertion the image comes after it in the stream
        marker_changed = not torch.equal(new[0, 8], base[0, 8])
        assert marker_changed == (variant != "insertion")
        assert (new[0, 9:] - base[0, 9:]).abs().amax(-1).min() > 1e-4  # every later token changes
        assert torch.equal(new[1], base[1])  # the other row never sees it
        # removing the image and everything from its marker on: the prefix is unchanged too
        prefix, _ = model(idx[:, :8], images_for(idx, images, 0, 8))
        torch.testing.assert_close(prefix, base[:, :8], atol=1e-5, rtol=1e-5)
        # text before the first image of row 1 (t < 5), with no image in the call at all
        text_only, _ = model(idx[1:, :5])
        torch.testing.assert_close(text_only[0], base[1, :5], atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# 4. KV-cache size: measured against the formula and against hand counts


def check_cache(model, cache, turns, T, B):
    cfg = model.config
    N, C = cfg.compress_queries or cfg.n_image_tokens, cfg.n_embd  # compressed insertion streams Q an image
    kinds = cfg.layer_kinds()
    n_sa, n_ca = sum(s for s, _ in kinds), sum(c for _, c in kinds)
    want = casa.kv_cache_entries(cfg, turns, T)
    assert cache.entries() == {k: B * v for k, v in want.items()}
    assert cache.nbytes() == casa.kv_cache_bytes(cfg, turns, T, batch_size=B)
    # the formula itself, by hand, from the paper's table (per layer of each kind, float32 K and V)
    text = turns * T + (turns * N if cfg.insert_images else 0)
    image = (turns * N if cfg.ca_all_images else N) if n_ca else 0  # D5 keeps every image
    window_text = T if cfg.ca_text_keys else 0
    assert want == {"self_attn": text, "cross_attn_image": image, "cross_attn_text": window_text}
    assert cache.nbytes() == B * (n_sa * text + n_ca * (image + window_text)) * 2 * C * 4
    return cache.nbytes()


def expect_growth(model, growth, T, B):
    """Bytes added by one more turn: text only for CA variants (the image part, and ca_tv's window
    text, stay flat); text and the N image tokens (Q, compressed) in every layer for insertion."""
    cfg = model.config
    n_sa = sum(s for s, _ in cfg.layer_kinds())
    per_entry = 2 * cfg.n_embd * 4
    if cfg.insert_images:
        assert growth == B * cfg.n_layer * (T + (cfg.compress_queries or cfg.n_image_tokens)) * per_entry
    elif cfg.ca_all_images:  # D5: every image stays in the CA layers
        n_ca = sum(c for _, c in cfg.layer_kinds())
        assert growth == B * (n_sa * T + n_ca * cfg.n_image_tokens) * per_entry
    else:
        assert growth == B * n_sa * T * per_entry


def check_turns(model, cache, one_turn, turns, T, B):
    """Run one_turn() `turns` times; after each, the cache matches the formula, and from the second
    on it has grown by exactly one turn's entries."""
    prev = None
    for turn in range(1, turns + 1):
        one_turn()
        nbytes = check_cache(model, cache, turn, T, B)
        if prev is not None:
            expect_growth(model, nbytes - prev, T, B)
        prev = nbytes


@pytest.mark.parametrize("variant, settings", ALL_MODELS, ids=MODEL_IDS)
def test_cache_size_after_turns_matches_formula(variant, settings):
    model = make_model(variant, **settings)
    B, T, S = 2, 6, model.config.image_size
    g = torch.Generator().manual_seed(3)
    cache = model.new_cache(B)
    assert cache.nbytes() == 0

    @torch.no_grad()
    def one_turn():
        idx = torch.cat([torch.full((B, 1), IMAGE_ID), torch.randint(0, 256, (B, T - 1), generator=g)], 1)
        model(idx, torch.rand(B, 3, S, S, generator=g), cache=cache)

    check_turns(model, cache, one_turn, 4, T, B)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_size_after_generate_turns_matches_formula(variant):
    model = make_model(variant)
    B, P, new, S = 1, 4, 3, model.config.image_size
    T = P + new  # every generated token is fed back into the cache
    g = torch.Generator().manual_seed(4)
    cache = model.new_cache(B)

    def one_turn():
        prompt = torch.tensor([[IMAGE_ID] + rand_text(P - 1, g)])
        out = model.generate(prompt, torch.rand(1, 3, S, S, generator=g), max_new_tokens=new, temperature=0,
                             cache=cache)
        assert out.shape == (1, T)

    check_turns(model, cache, one_turn, 3, T, B)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_bytes_follow_the_dtype(variant):
    """bf16 keys and values take half the bytes: measured, and in the formula (bytes_per_value=2)."""
    B, T = 1, 5
    g = torch.Generator().manual_seed(8)
    idx = [torch.tensor([[IMAGE_ID] + rand_text(T - 1, g)]) for _ in range(2)]
    imgs = [torch.rand(1, 3, 16, 16, generator=g) for _ in range(2)]
    measured = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = make_model(variant, dtype=dtype)
        cache = model.new_cache(B)
        with torch.no_grad():
            for i, im in zip(idx, imgs):
                model(i, im.to(dtype), cache=cache)
        measured[dtype] = cache.nbytes()
    cfg = make_config(variant)
    assert measured[torch.float32] == casa.kv_cache_bytes(cfg, 2, T)
    assert measured[torch.bfloat16] == casa.kv_cache_bytes(cfg, 2, T, bytes_per_value=2)
    assert measured[torch.bfloat16] * 2 == measured[torch.float32]


# -----------------------------------------------------------------------------
# 5. Parameters: ca_shared adds none, ca_replace swaps every second SA for a CA


def test_param_counts_and_layer_layout():
    models = {v: make_model(v) for v in VARIANTS}
    C, L = 32, 4
    attn_layer = C * C + 2 * C * C + C * C + C  # q, kv, o (no bias) and the CA norm
    counts = {v: casa.param_counts(m) for v, m in models.items()}
    for v, m in models.items():
        assert counts[v]["total"] == sum(p.numel() for p in m.parameters())  # tied weights once
        assert counts[v]["vision"] == sum(p.numel() for p in m.vision.parameters())
        assert counts[v]["vision"] == counts["insertion"]["vision"]
    ins = counts["insertion"]["total"]
    assert counts["insertion"]["fusion"] == 0
    # D1: no new parameters at all
    assert counts["ca_shared"]["total"] == ins and counts["ca_shared"]["fusion"] == 0
    assert not any(".ca." in n or "ln_ca" in n for n, _ in models["ca_shared"].named_parameters())
    assert all(b.has_sa and b.has_ca for b in models["ca_shared"].blocks)
    # ca, ca_tv, ca_ffn: one CA (projections + norm) per layer
    for v in ("ca", "ca_tv", "ca_ffn"):
        assert counts[v]["fusion"] == L * attn_layer
        assert counts[v]["total"] == ins + L * attn_layer
    # D3: odd layers have CA and no SA, even layers SA and no CA; same size as insertion
    for i, b in enumerate(models["ca_replace"].blocks):
        assert (b.has_sa, b.has_ca) == (i % 2 == 0, i % 2 == 1)
        assert hasattr(b, "sa") == (i % 2 == 0) and hasattr(b, "ca") == (i % 2 == 1)
    assert counts["ca_replace"]["total"] == ins
    assert counts["ca_replace"]["fusion"] == (L // 2) * attn_layer


@pytest.mark.parametrize("variant", ["ca", "ca_replace", "ca_shared"])
def test_adaptation_copies_insertion_weights_and_starts_ca_from_sa(variant):
    """Table 3's start (train.py --init_from): every tensor both models have is copied from the
    insertion model; a layer's new CA projections start as that layer's SA ones in the source."""
    src = make_model("insertion", seed=0).state_dict()
    model = make_model(variant, seed=1)  # other random weights, so a copy is visible
    copied = model.copy_weights_from(src)
    own = model.state_dict()
    names = {n for n, _ in model.named_parameters()}
    assert copied == {n for n in names if n in src}
    for n in copied:
        assert torch.equal(own[n], src[n]), n
    ca = [n for n in own if ".ca." in n]
    assert bool(ca) == (variant != "ca_shared")  # D1 reuses the SA projections: nothing new
    for n in ca:
        assert n not in src and torch.equal(own[n], src[n.replace(".ca.", ".sa.")]), n


# -----------------------------------------------------------------------------
# 6. Gradients reach the vision encoder and the fusion layers


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_vision_and_fusion(variant):
    model = make_model(variant, dtype=torch.float64)
    idx, images = two_row_batch(dtype=torch.float64)
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -1
    targets[0, :3] = -1  # loss only on text that has an image in its window
    targets[1, :5] = -1

    loss = model(idx, images, targets)[1]  # the training loss
    loss.backward()
    for name, p in model.vision.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient on vision.{name}"
    fusion = [(n, p) for n, p in model.named_parameters() if ".ca." in n or ".ln_ca." in n]
    if variant in ("ca_shared", "insertion"):
        assert fusion == []  # their fusion is the SA itself
    else:
        assert fusion
        for name, p in fusion:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient on {name}"

    # the gradient values, against central finite differences. casa's loss is taken in float32
    # (logits.float()), too coarse for differences; this one stays in float64.
    def loss_fn():
        logits = model(idx, images)[0]
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    model.zero_grad()
    loss_fn().backward()
    fusion_param = dict(model.named_parameters())["blocks.1.ca.kv.weight" if fusion else "blocks.1.sa.kv.weight"]
    for p in (model.vision.stem[0].weight, model.vision.blocks[0].qkv.weight, fusion_param):
        i = int(p.grad.abs().argmax())
        eps = 1e-6
        with torch.no_grad():
            flat = p.view(-1)
            old = flat[i].item()
            flat[i] = old + eps
            up = loss_fn().item()
            flat[i] = old - eps
            down = loss_fn().item()
            flat[i] = old
        fd = (up - down) / (2 * eps)
        assert fd == pytest.approx(p.grad.view(-1)[i].item(), rel=1e-5, abs=1e-9)


# -----------------------------------------------------------------------------
# 7. Bad inputs: one clear error each


def test_bad_images_raise_clear_errors():
    model = make_model("ca")
    idx = torch.tensor([[1, 2, IMAGE_ID, 3]])
    good = torch.rand(1, 3, 16, 16)
    model(idx, good)  # the good case works
    cases = [
        (torch.rand(1, 3, 8, 8), r"images must be \(M, 3, 16, 16\) RGB"),  # wrong size
        (torch.rand(1, 3, 16, 8), r"images must be \(M, 3, 16, 16\) RGB"),
        (torch.rand(1, 1, 16, 16), r"images must be \(M, 3, 16, 16\) RGB"),  # grayscale
        (torch.rand(1, 4, 16, 16), r"images must be \(M, 3, 16, 16\) RGB"),  # RGBA
        (torch.rand(3, 16, 16), r"images must be \(M, 3, 16, 16\) RGB"),  # no batch dim
        (torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8), r"floats in \[0, 1\].*divide uint8"),
        (good * 255, r"image values must lie in \[0, 1\]"),
        (good - 0.5, r"image values must lie in \[0, 1\]"),
    ]
    for images, match in cases:
        with pytest.raises(ValueError, match=match):
            model(idx, images)


@pytest.mark.parametrize("variant, settings", [("ca", {}), ("ca_tv", {}), ("insertion", {}), ("insertion", dict(compress_queries=2))])
def test_shared_images_equal_each_marker_its_own_copy(variant, settings):
    # image_index lets several samples show one image (encoded once): logits, loss and every gradient
    # equal those of the same batch with the image copied to each marker
    idx = torch.tensor([[IMAGE_ID, 5, 6, 7], [IMAGE_ID, 8, 9, 10], [IMAGE_ID, 11, 12, 13]])
    targets = torch.tensor([[-1, 6, 7, 1], [-1, 9, 10, 2], [-1, 12, 13, 3]])
    images = torch.rand(2, 3, 16, 16)
    image_index = torch.tensor([1, 0, 1])
    results = []
    for imgs, index in ((images, image_index), (images[image_index], None)):
        model = make_model(variant, **settings)
        logits, loss = model(idx, imgs, targets, image_index=index)
        loss.backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(a, b)
    assert grads_a.keys() == grads_b.keys() and any(n.startswith("vision.") for n in grads_a)
    for n in grads_a:  # the same sums in another order (a shared image's gradient gathers its samples'
        # before the encoder, copies after it): float32 rounding differs by a few 1e-6 on some CPUs
        torch.testing.assert_close(grads_a[n], grads_b[n], atol=1e-5, rtol=1e-5)
    model = make_model(variant, **settings)
    for index, match in ((torch.tensor([0, 2, 1]), r"image_index must lie in \[0, 2\)"),
                         (torch.tensor([0, 1]), r"3 <\|image\|> markers in idx but 2 images"),
                         (torch.tensor([0.0, 1.0, 1.0]), r"image_index must be a 1-D long tensor")):
        with pytest.raises(ValueError, match=match):
            model(idx, images, image_index=index)


def test_bad_token_inputs_raise_clear_errors():
    model = make_model("insertion")
    S = 16
    with pytest.raises(ValueError, match=r"longer than the context \(block_size=64\)"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"longer than the context"):
        model.generate(torch.zeros(1, 65, dtype=torch.long), max_new_tokens=1)
    idx = torch.tensor([[IMAGE_ID, 1, IMAGE_ID, 2]])
    with pytest.raises(ValueError, match=r"2 <\|image\|> markers in idx but 3 images"):  # too many
        model(idx, torch.rand(3, 3, S, S))
    with pytest.raises(ValueError, match=r"2 <\|image\|> markers in idx but 1 images"):  # too few
        model(idx, torch.rand(1, 3, S, S))
    with pytest.raises(ValueError, match=r"2 <\|image\|> markers in idx but 0 images"):
        model(idx)
    with pytest.raises(ValueError, match=r"0 <\|image\|> markers in idx but 1 images"):
        model(torch.tensor([[1, 2]]), torch.rand(1, 3, S, S))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 259\)"):
        model(torch.tensor([[1, 259]]))
    with pytest.raises(ValueError, match=r"unknown variant 'cross'; choose one of ca, "):
        make_config("cross")


def test_cache_for_another_batch_size_raises():
    model = make_model("ca_tv")
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match=r"cache was made for batch size 2, idx has 1 rows"):
        model(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(ValueError, match=r"cache was made for batch size 2, idx has 3 rows"):
        model.generate(torch.zeros(3, 2, dtype=torch.long), max_new_tokens=1, cache=cache)


def test_stem_norm_puts_every_image_token_at_rms_one_before_the_position_embeddings():
    """The stem's output per token at RMS 1 (its learned scale starts at 1): without it the signal of
    a 16 px patch leaves four conv-pool stages about 100x smaller than it came in."""
    torch.manual_seed(0)
    images = torch.rand(4, 3, 64, 64)
    for stem_norm in (True, False):
        enc = casa.VisionEncoder(casa.Config(image_size=64, patch_size=16, stem_norm=stem_norm))
        x = enc.ln_stem(enc.stem(images * 2 - 1).permute(0, 2, 3, 1))  # what forward adds the positions to
        rms = x.pow(2).mean(-1).sqrt()  # (M, grid, grid)
        if stem_norm:
            torch.testing.assert_close(rms, torch.ones_like(rms), atol=0.02, rtol=0)  # eps 1e-6 against ~1e-4
        else:
            assert rms.max() < 0.1


def test_a_checkpoint_from_before_the_stem_norm_loads_as_it_was_trained(tmp_path):
    """A config saved without stem_norm (checkpoints made before it existed) rebuilds the encoder it
    was trained with, not today's default, and gives the same logits."""
    model = make_model("ca", stem_norm=False)
    path = tmp_path / "old.pt"
    casa.save_checkpoint(path, model)
    ck = torch.load(path, weights_only=True)
    del ck["config"]["stem_norm"]
    torch.save(ck, path)
    loaded, _ = casa.load_checkpoint(str(path))
    assert loaded.config.stem_norm is False and casa.Config().stem_norm is True
    idx, images = two_row_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(idx, images)[0], model(idx, images)[0], atol=0, rtol=0)


def test_pos_std_draws_the_position_embeddings_and_nothing_else():
    """pos_std sets only the row and column embeddings' initial scale, drawn after every other weight:
    the rest of the model is bit for bit the model of pos_std=0 (the tables' recipe), whose position
    embeddings are zeros; an old checkpoint's config (no pos_std) rebuilds with 0."""
    models = {}
    for pos_std in (0.0, 0.5):
        torch.manual_seed(0)
        models[pos_std] = casa.VLM(casa.Config(image_size=64, patch_size=8, pos_std=pos_std)).state_dict()
    pos = ("vision.row_emb", "vision.col_emb")
    for name, w in models[0.0].items():
        if name in pos:
            assert not w.any()
            drawn = models[0.5][name]  # 8 x 128 values a table: its std within ~10% of 0.5
            assert abs(drawn.std().item() - 0.5) < 0.06 and drawn.shape == w.shape
        else:
            assert torch.equal(w, models[0.5][name]), name
    assert not torch.equal(models[0.5][pos[0]].squeeze(), models[0.5][pos[1]].squeeze())
    assert casa.Config(**casa.checkpoint_config({})).pos_std == 0.0 and casa.Config().pos_std == 0.5


def test_stem_he_init_draws_the_stem_convs_at_two_over_fan_in_and_nothing_else():
    """stem_he_init redraws only the vision stem's conv weights (variance 2 / fan_in, He et al.) and
    zeroes their biases, after every other weight: the rest of the model is bit for bit the model
    without it. Its point, checked on random images: the image's signal keeps its size through the
    four conv-GELU-pool stages, where PyTorch's default init shrinks it every stage. An old
    checkpoint's config (no stem_he_init) rebuilds without it."""
    models = {}
    for he in (False, True):
        torch.manual_seed(0)
        models[he] = casa.VLM(casa.Config(image_size=64, patch_size=16, stem_he_init=he))
    states = {he: m.state_dict() for he, m in models.items()}
    convs = [name for name, m in models[True].named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(name.startswith("vision.stem.") for name in convs)
    for name, w in states[False].items():
        if name.rsplit(".", 1)[0] in convs:
            drawn = states[True][name]
            if name.endswith("bias"):
                assert not drawn.any()
            else:
                fan_in = w[0].numel()  # c_in * 3 * 3
                assert abs(drawn.std().item() / (2 / fan_in) ** 0.5 - 1) < 0.1
                assert drawn.std() > 2 * w.std()  # PyTorch's default: a third of the variance
        else:
            assert torch.equal(w, states[True][name]), name
    torch.manual_seed(1)
    x = torch.rand(16, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        out = {he: m.vision.stem(x) for he, m in models.items()}
    assert out[True].std() > 0.3 and out[False].std() < 0.1  # measured 0.9 and 0.01 on scenes images
    assert casa.Config(**casa.checkpoint_config({})).stem_he_init is False


def test_checkpoints_and_state_dicts(tmp_path):
    model = make_model("ca_tv")
    path = str(tmp_path / "ckpt.pt")
    casa.save_checkpoint(path, model, iter_num=7)
    loaded, ckpt = casa.load_checkpoint(path)
    assert ckpt["iter_num"] == 7 and loaded.config == model.config
    idx, images = two_row_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(idx, images)[0], model(idx, images)[0], atol=0, rtol=0)

    # a checkpoint whose weights come from another config (another variant / another width)
    other = make_model("insertion")
    ck = torch.load(path, weights_only=True)
    ck["model"] = other.state_dict()
    torch.save(ck, tmp_path / "mixed.pt")
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict"):
        casa.load_checkpoint(str(tmp_path / "mixed.pt"))
    ck["model"] = make_model("ca_tv", n_embd=64).state_dict()
    torch.save(ck, tmp_path / "wide.pt")
    with pytest.raises(RuntimeError, match=r"size mismatch"):
        casa.load_checkpoint(str(tmp_path / "wide.pt"))
    # a config this casa.py does not know
    ck = torch.load(path, weights_only=True)
    ck["config"]["n_experts"] = 8
    torch.save(ck, tmp_path / "future.pt")
    with pytest.raises(ValueError, match=r"saved with a config this casa.py does not know"):
        casa.load_checkpoint(str(tmp_path / "future.pt"))
    # files that are not checkpoints
    torch.save({"weights": 1}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match=r"is not a casa checkpoint"):
        casa.load_checkpoint(str(tmp_path / "dict.pt"))
    (tmp_path / "notes.txt").write_text("hello, not a checkpoint\n")
    with pytest.raises(ValueError, match=r"is not a casa checkpoint"):
        casa.load_checkpoint(str(tmp_path / "notes.txt"))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is not a casa checkpoint"):
        casa.load_checkpoint(str(tmp_path / "empty.pt"))
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found"):
        casa.load_checkpoint(str(tmp_path / "missing.pt"))

    # load_state_dict of another variant's state dict raises when the parameters differ. Variants
    # with the same parameters cannot be told apart from a state dict alone: {ca, ca_tv, ca_ffn}
    # and {ca_shared, insertion} (D1: no new parameters) load each other's weights silently; only
    # load_checkpoint, which rebuilds the model from the stored config, keeps the variant.
    groups = [("ca", "ca_tv", "ca_ffn"), ("ca_shared", "insertion"), ("ca_replace",)]
    keys = {v: {k: tuple(t.shape) for k, t in make_model(v).state_dict().items()} for v in VARIANTS}
    for group in groups:
        assert all(keys[v] == keys[group[0]] for v in group)
    reps = [g[0] for g in groups] + ["insertion"]
    for a in reps:
        for b in reps:
            if keys[a] != keys[b]:
                with pytest.raises(RuntimeError, match=r"(Missing|Unexpected) key\(s\) in state_dict"):
                    make_model(a).load_state_dict(make_model(b).state_dict())


# -----------------------------------------------------------------------------
# 8. Generation


def greedy_by_full_forwards(model, idx, images, n):
    """Greedy decoding with no cache: a full forward per new token, <|image|> never chosen."""
    seq = idx
    with torch.no_grad():
        for _ in range(n):
            last = model(seq, images)[0][:, -1].clone()
            last[:, IMAGE_ID] = float("-inf")
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_greedy_equals_full_forward_argmax(variant):
    model = make_model(variant)
    idx, images = two_row_batch()
    want = greedy_by_full_forwards(model, idx, images, 8)
    got = model.generate(idx, images, max_new_tokens=8, temperature=0)
    assert torch.equal(got, want)
    got_cache = model.generate(idx, images, max_new_tokens=8, temperature=0, cache=model.new_cache(2))
    assert torch.equal(got_cache, want)


def test_generate_stop_token():
    model = make_model("ca")
    idx, images = two_row_batch()
    ref = greedy_by_full_forwards(model, idx[:1], images[:3], 10)[0, 18:].tolist()
    stop = ref[3]
    j = ref.index(stop)  # first time row 0 emits it
    out = model.generate(idx[:1], images[:3], max_new_tokens=10, temperature=0, stop_token=stop)
    assert out[0, 18:].tolist() == ref[: j + 1]  # stops right after emitting it
    # batch: a row that stopped is padded with stop_token while the other goes on
    ref2 = greedy_by_full_forwards(model, idx, images, 6)[:, 18:]
    stop = int(ref2[1, 0])
    assert stop not in ref2[0].tolist()
    out = model.generate(idx, images, max_new_tokens=6, temperature=0, stop_token=stop)
    assert out[0, 18:].tolist() == ref2[0].tolist()
    assert out[1, 18:].tolist() == [stop] * 6


def test_generate_never_emits_the_image_marker():
    """Images come from the caller: even when <|image|> has by far the highest logit, generate picks
    the best other token (greedy) and never samples it (temperature, top-k)."""
    model = make_model("ca")
    model.lm_head.register_forward_hook(lambda mod, inp, out: out.index_add(
        -1, torch.tensor([IMAGE_ID]), torch.full(out.shape[:-1] + (1,), 1e3)))
    idx, images = two_row_batch()
    with torch.no_grad():
        assert bool((model(idx, images)[0].argmax(-1) == IMAGE_ID).all())
    want = greedy_by_full_forwards(model, idx, images, 5)  # argmax over the other tokens
    assert torch.equal(model.generate(idx, images, max_new_tokens=5, temperature=0), want)
    torch.manual_seed(0)
    out = model.generate(idx, images, max_new_tokens=5, temperature=1.0, top_k=3)
    assert not bool((out[:, 18:] == IMAGE_ID).any())


@pytest.mark.parametrize("variant", VARIANTS)
def test_streaming_generate_equals_full_forward(variant):
    """Two generate calls on one cache, a new image each: the same as one full forward over the
    concatenated sequence (tokens: each is that forward's argmax; logits: one more cached step)."""
    model = make_model(variant)
    g = torch.Generator().manual_seed(5)
    S = model.config.image_size
    p1 = torch.tensor([rand_text(3, g) + [IMAGE_ID] + rand_text(4, g)])  # text before the image
    p2 = torch.tensor([[IMAGE_ID] + rand_text(5, g)])
    im1, im2 = torch.rand(1, 3, S, S, generator=g), torch.rand(1, 3, S, S, generator=g)
    cache = model.new_cache(1)
    out1 = model.generate(p1, im1, max_new_tokens=5, temperature=0, cache=cache)
    out2 = model.generate(p2, im2, max_new_tokens=5, temperature=0, cache=cache)
    assert torch.equal(out2[:, : p2.size(1)], p2)
    seq = torch.cat([out1, out2], dim=1)
    both = torch.cat([im1, im2])
    with torch.no_grad():
        full, _ = model(seq, both)
        full[..., IMAGE_ID] = float("-inf")
        pred = full.argmax(-1)
        n1 = out1.size(1)
        for start, n_prompt, out in ((0, p1.size(1), out1), (n1, p2.size(1), out2)):
            gen = range(start + n_prompt, start + out.size(1))
            assert [int(pred[0, t - 1]) for t in gen] == seq[0, list(gen)].tolist()
        extra = torch.tensor([[7]])
        step_logits, _ = model(extra, cache=cache)
        full2, _ = model(torch.cat([seq, extra], 1), both)
    torch.testing.assert_close(step_logits[:, -1], full2[:, -1], atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# 9. FLOPs formula against torch's FLOP counter


@pytest.mark.parametrize("variant, settings", ALL_MODELS, ids=MODEL_IDS)
def test_flops_formula_matches_flop_counter(variant, settings):
    """FlopCounterMode counts matmuls (mm / addmm: every nn.Linear, the lm_head included) and
    convolutions (the vision stem) exactly, 2 per multiply-add. On CPU it does not count
    scaled_dot_product_attention at all (no formula for the CPU kernels), so:
      - 'linear' is compared exactly with the non-vision linear FLOPs;
      - 'vision' minus the encoder's attention term (4 * Cv * N^2 per vision layer: scores and
        weighted sum, inside SDPA) is compared exactly with the encoder's linear + conv FLOPs;
      - 'attention' cannot come from the counter: beyond SDPA being uncounted, the formula counts
        only the keys each query really sees (causal, windowed), while the kernels compute a dense
        masked score matrix. It is compared instead with the keys the naive reference attends to,
        4 * C FLOPs per (query, key) pair (2C for the score, 2C for the weighted sum)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = make_model(variant, **settings)
    cfg = model.config
    T = 9
    g = torch.Generator().manual_seed(6)
    idx = torch.tensor([[IMAGE_ID] + rand_text(T - 1, g)])  # one turn: marker first, one image
    img = torch.rand(1, 3, 16, 16, generator=g)
    linear_ops = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.convolution}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(idx, img)
    counts = counter.get_flop_counts()

    def linear_flops(name):
        return sum(n for op, n in counts.get(name, {}).items() if op in linear_ops)

    total, vision = linear_flops("Global"), linear_flops("VLM.vision")
    assert vision > 0 and total > vision
    f = casa.flops_per_text_token(cfg, T)
    N, Cv = cfg.n_image_tokens, cfg.n_vis_embd
    vis_attention = cfg.n_vis_layer * 4 * Cv * N * N
    assert round(f["linear"] * T) == total - vision
    assert round(f["vision"] * T) - vis_attention == vision
    assert f["total"] == pytest.approx(f["linear"] + f["attention"] + f["vision"])
    KEYS_SEEN.append(0)
    try:
        with torch.no_grad():
            reference_forward(model, idx, img)
        keys = KEYS_SEEN[-1]
    finally:
        KEYS_SEEN.clear()
    assert keys > 0 and round(f["attention"] * T) == 4 * cfg.n_embd * keys
    # and the per-token view: lm_head is per text token, image K/V once per image (not per token)
    C = cfg.n_embd
    assert linear_flops("VLM.lm_head") == T * 2 * C * cfg.vocab_size
    if not cfg.insert_images:
        kv = "sa.kv" if cfg.ca_shared else "ca.kv"
        i = next(i for i, b in enumerate(model.blocks) if b.has_ca)
        text_kv = (T * 2 * 2 * C * C) if (cfg.ca_shared or cfg.ca_text_keys) else 0
        assert linear_flops(f"VLM.blocks.{i}.{kv}") == N * 2 * 2 * C * C + text_kv


# -----------------------------------------------------------------------------
# 10. attention_mass


@pytest.mark.parametrize("variant", ["ca_tv", "insertion"])
def test_attention_mass_matches_naive_softmax(variant):
    model = make_model(variant, dtype=torch.float64)
    cfg = model.config
    idx, images = two_row_batch(dtype=torch.float64)
    got = casa.attention_mass(model, idx, images)
    n_mixed = cfg.n_layer  # every ca_tv block has a CA layer; every insertion block an SA layer
    assert got.shape == (n_mixed, cfg.n_head)
    assert bool(((got >= 0) & (got <= 1)).all())
    assert 0.0 < float(got.min()) and float(got.max()) < 1.0
    records = {}
    with torch.no_grad():
        reference_forward(model, idx, images, records=records)
    # queries that can see an image: all text from the first marker on (ca_tv, the marker included;
    # insertion: the marker precedes its image so it sees only earlier images)
    n_queries = (18 - 3) + (18 - 5) if variant == "ca_tv" else (18 - 4) + (18 - 6)
    want = torch.stack([torch.stack(records[li]).mean(0) for li in sorted(records)])
    assert all(len(records[li]) == n_queries for li in records)
    torch.testing.assert_close(got, want, **REF_TOL)
    # the recording copies of attend() are gone again: no instance attribute shadows the method
    attns = [a for b in model.blocks for a in (getattr(b, "sa", None), getattr(b, "ca", None)) if a is not None]
    assert all("attend" not in vars(a) for a in attns)


@pytest.mark.parametrize("variant", ["ca_tv", "insertion"])
def test_attention_mass_uniform_attention_closed_form(variant):
    """With every query projection zeroed, each softmax is uniform over the keys a query sees, so
    the image share has a closed form from the layout alone:
      ca_tv: a query s tokens after its window's marker sees N image keys and s + 1 text keys:
             share N / (N + s + 1);
      insertion: a text query at stream position p sees p + 1 keys, N per earlier image."""
    model = make_model(variant, dtype=torch.float64)
    cfg = model.config
    N = cfg.n_image_tokens
    with torch.no_grad():
        for b in model.blocks:
            (b.ca if variant == "ca_tv" else b.sa).q.weight.zero_()
    idx, images = two_row_batch(dtype=torch.float64)
    shares = []
    for row in idx.tolist():
        markers = [t for t, tok in enumerate(row) if tok == IMAGE_ID]
        for t in range(len(row)):
            before = [p for p in markers if p <= t] if variant == "ca_tv" else [p for p in markers if p < t]
            if not before:
                continue
            if variant == "ca_tv":
                shares.append(N / (N + (t - before[-1]) + 1))
            else:
                stream_pos = t + N * len(before)
                shares.append(N * len(before) / (stream_pos + 1))
    want = torch.full((cfg.n_layer, cfg.n_head), sum(shares) / len(shares), dtype=torch.float64)
    torch.testing.assert_close(casa.attention_mass(model, idx, images), want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in ("ca_tv", "insertion")])
def test_attention_mass_raises_without_mixed_softmax(variant):
    model = make_model(variant)
    idx, images = two_row_batch()
    with pytest.raises(ValueError, match=r"never puts text and image keys in one softmax"):
        casa.attention_mass(model, idx, images)


# -----------------------------------------------------------------------------
# 11. Tokenizer


def test_tokenizer_bytes_round_trip_and_specials(monkeypatch):
    import socket

    def no_network(*a, **k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)  # works offline
    tok = casa.get_tokenizer()
    text = "What is this? A yellow house! Ünïcødé ✓ 日本"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # one token per UTF-8 byte
    assert tok.decode(ids) == text
    assert [tok.encode(s, allowed_special="all") for s in casa.SPECIAL_TOKENS] == [[256], [257], [258]]
    assert tok.encode(casa.IMAGE, allowed_special="all") == [IMAGE_ID]
    assert tok.n_vocab == casa.Config().vocab_size == 259
    mixed = "hi<|image|>there<|answer|>ok<|endoftext|>"
    ids = tok.encode(mixed, allowed_special="all")
    assert ids == [104, 105, 257] + list(b"there") + [258, 111, 107, 256]
    assert tok.decode(ids) == mixed
    # a special token typed as plain text is refused unless allowed
    with pytest.raises(ValueError):
        tok.encode("<|image|>")
    ids, n_prompt = casa.encode_turn(tok, "<|image|>hi", "yo")
    assert ids == [257, 104, 105, 258, 121, 111, 256] and n_prompt == 4




def test_pick_device_refuses_what_this_machine_does_not_have():
    assert casa.pick_device("cpu") == "cpu" and casa.pick_device("auto") in ("cpu", "cuda", "mps")
    for name, says in [("banana", "unknown device"), ("meta", "not supported"), ("cuda:99", "cuda")]:
        with pytest.raises(ValueError, match=says):
            casa.pick_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            casa.pick_device("cuda")


def test_pick_threads_leaves_busy_cores_alone(monkeypatch):
    """Idle cores = the cores this process may use less the 1-minute load, at least 1."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    for load, want in [(0.0, 4), (1.2, 3), (3.6, 1), (9.0, 1)]:
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert casa.pick_threads(0)[0] == want
    assert casa.pick_threads(7) == (7, "--threads")


# -----------------------------------------------------------------------------
# 11. The paper's Table 5: where the CA layers are, and compressed insertion


def test_ca_every_places_ca_in_blocks_0_n_2n_and_n1_is_todays_model():
    for variant in ("ca", "ca_tv", "ca_shared", "ca_ffn", "ca_all"):
        for n, want in [(1, [0, 1, 2, 3, 4, 5]), (2, [0, 2, 4]), (4, [0, 4]), (6, [0])]:
            model = make_model(variant, n_layer=6, ca_every=n)
            assert [i for i, b in enumerate(model.blocks) if b.has_ca] == want
            assert all(b.has_sa for b in model.blocks)
            ca_params = sum(p.numel() for name, p in model.named_parameters() if casa.is_fusion_param(name))
            per_layer = 0 if variant == "ca_shared" else 32 + 4 * 32 * 32  # ln_ca + q, k, v, o (width 32)
            assert ca_params == len(want) * per_layer
    # n = 1 and no compression are today's models, weight for weight and logit for logit
    idx, images = two_row_batch()
    for variant, settings in [("ca_tv", dict(ca_every=1)), ("insertion", dict(compress_queries=0))]:
        torch.manual_seed(0)
        a = casa.VLM(make_config(variant, **settings))
        torch.manual_seed(0)
        b = casa.VLM(make_config(variant))
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        with torch.no_grad():
            assert torch.equal(a(idx, images)[0], b(idx, images)[0])
    for variant, settings in [("insertion", dict(ca_every=2)), ("ca_replace", dict(ca_every=2)),
                              ("ca", dict(ca_every=0)), ("ca", dict(compress_queries=4))]:
        with pytest.raises(ValueError):
            make_config(variant, **settings)


def test_compressed_insertion_caches_q_tokens_an_image():
    """The stream holds Q tokens after each marker, not N: the layout, the KV formula and what the
    cache really holds agree."""
    model = make_model("insertion", compress_queries=3)
    cfg = model.config
    assert (cfg.n_image_tokens, cfg.tokens_per_image) == (16, 3) and casa.kv_formula(cfg) == "kT + kQ"
    idx, images = two_row_batch()
    with torch.no_grad():
        img = model.encode_images(idx, images)
    assert img.shape == (5, 3, cfg.n_embd)
    layout = casa.make_layout(cfg, idx, idx == model.image_id, img.size(1), cache=None)
    assert layout.is_image.sum(1).tolist() == [3 * 3, 2 * 3]  # row 0 has three images, row 1 two
    e = casa.kv_cache_entries(cfg, turns=5, text_tokens=7)
    assert e["self_attn"] == 5 * (7 + 3)
