"""The KV store on its own, against plain Python lists: what each layer wrote, in any layer order,
through growth, and what keep() leaves. (Cached decoding against a full forward, for every variant,
is in test_model.py.)"""

import random

import torch

import casa

B, H, D = 2, 3, 4


def test_store_returns_everything_written_in_any_layer_order():
    """write(i, k, v) returns layer i's keys/values so far, whatever order the layers write in (no
    hidden layer counter), and growing the capacity keeps every earlier slot."""
    rng = random.Random(0)
    layers = [0, 2, 3]
    store = casa.KVStore(layers, B, H, D, "cpu")
    written = {i: [] for i in layers}  # the naive reference: every k written, per layer
    for _ in range(12):  # 12 calls of 1-9 slots: several capacity doublings (16, 32, 64)
        n = rng.randint(1, 9)
        store.begin(n, torch.float32)
        order = layers[:]
        rng.shuffle(order)
        for i in order:
            k, v = torch.randn(B, H, n, D), torch.randn(B, H, n, D)
            written[i].append((k, v))
            got_k, got_v = store.write(i, k, v)
            torch.testing.assert_close(got_k, torch.cat([k for k, _ in written[i]], dim=2), rtol=0, atol=0)
            torch.testing.assert_close(got_v, torch.cat([v for _, v in written[i]], dim=2), rtol=0, atol=0)
        store.commit(torch.zeros(B, n, dtype=torch.long), torch.ones(B, n, dtype=torch.bool))
    total = sum(k.size(2) for k, _ in written[0])
    assert store.length == total and store.entries() == B * total
    assert store.nbytes() == B * total * len(layers) * H * D * 2 * 4  # K and V, float32
    assert store.allocated_bytes() >= store.nbytes()


def test_keep_moves_kept_slots_to_the_front_in_order():
    """keep(mask) leaves, per row, exactly the kept slots in their order, flags with them."""
    torch.manual_seed(0)
    store = casa.KVStore([1], B, H, D, "cpu")
    n = 10
    store.begin(n, torch.float32)
    k, v = torch.randn(B, H, n, D), torch.randn(B, H, n, D)
    store.write(1, k, v)
    pos = torch.arange(n).expand(B, n) + 100 * torch.arange(B)[:, None]
    store.commit(pos, torch.ones(B, n, dtype=torch.bool))
    keep = torch.rand(B, n) < 0.5
    keep[0, :7] = True  # row 0 keeps at least 7: the longest row sets the length
    store.keep(keep)
    assert store.length == int(keep.sum(1).max())
    for b in range(B):
        kept = keep[b].nonzero()[:, 0]
        m = len(kept)
        assert store.valid[b, :m].all() and not store.valid[b, m : store.length].any()
        assert store.pos[b, :m].tolist() == pos[b, kept].tolist()
        torch.testing.assert_close(store.k[1][b, :, :m], k[b, :, kept], rtol=0, atol=0)
        torch.testing.assert_close(store.v[1][b, :, :m], v[b, :, kept], rtol=0, atol=0)
    assert store.entries() == int(keep.sum())


def test_store_without_layers_keeps_nothing():
    """A variant without some kind of attention (insertion: no CA) has an empty store for it."""
    cache = casa.VLM(casa.Config(variant="insertion", image_size=8, patch_size=4, n_layer=2, n_embd=32,
                                 n_head=2, n_vis_embd=16, n_vis_head=2, n_vis_layer=1)).new_cache(1)
    assert cache.ca_image.layers == [] and cache.ca_text.layers == [] and cache.sa.layers == [0, 1]
    store = cache.ca_image
    store.begin(5, torch.float32)
    store.commit(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool))
    assert store.length == 0 and store.entries() == 0 and store.nbytes() == 0 and store.allocated_bytes() == 0
