"""
The KV cache of the paper's backbones, projected with casa's formula: bytes per turn for each fusion
variant (bf16), after 256 turns, and the turn at which the cache alone passes 80 GB.

    python -m experiments.kv_projection
    python -m experiments.kv_projection --image_tokens=64,256 --text_tokens=32

casa.kv_cache_bytes assumes as many K/V heads as query heads; under grouped-query attention a
cached entry of one layer holds K and V of n_kv_head heads, so each backbone is priced as the model
of width n_kv_head * head_dim (the same formula, the width of what is cached).
"""

import math
import sys

import casa
import configurator
from stream import format_bytes

# -----------------------------------------------------------------------------
text_tokens = 16  # T text tokens per turn
image_tokens = "256,1024"  # N image tokens per frame, a comma list
# -----------------------------------------------------------------------------
BUDGET = 80e9  # bytes: one 80 GB accelerator
PRESETS = {
    "Helium1-2B": dict(n_layer=24, n_head=20, n_kv_head=20, head_dim=128,
                       source="kyutai/helium-1-preview-2b config.json (hidden 2560, no GQA); "
                              "ASSUMED the same for the final helium-1-2b"),
    "Qwen2.5-VL-3B": dict(n_layer=36, n_head=16, n_kv_head=2, head_dim=128,
                          source="Qwen/Qwen2.5-VL-3B-Instruct config.json (hidden 2048, GQA)"),
}


def kv_config(preset, variant):
    """A casa.Config whose cached entry is the preset's: K and V of n_kv_head heads of head_dim, in
    each of its layers."""
    p = PRESETS[preset]
    return casa.Config(n_layer=p["n_layer"], n_head=p["n_kv_head"], n_embd=p["n_kv_head"] * p["head_dim"],
                       variant=variant)


def projection_rows(preset, image_tokens, text_tokens, budget=BUDGET, bytes_per_value=2):
    """Per variant: KV bytes per turn (after the first turn, i.e. the growth per turn), KV after 1
    and 256 turns, and the first turn whose cache exceeds the budget."""
    rows = []
    for v in casa.VARIANTS:
        config = kv_config(preset, v)

        def kv(k):
            return casa.kv_cache_bytes(config, k, text_tokens, image_tokens, bytes_per_value=bytes_per_value)

        growth = kv(2) - kv(1)  # every turn after the first adds exactly this
        over = 1 if kv(1) > budget else 1 + math.floor((budget - kv(1)) / growth) + 1
        rows.append(dict(variant=v, formula=casa.kv_formula(config), per_turn=growth, kv_1=kv(1), kv_256=kv(256),
                         turn_over_budget=over))
    return rows


def main(argv=None):
    configurator.apply(globals(), argv)
    try:
        sizes = [int(n) for n in image_tokens.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        sys.exit(f"error: --image_tokens takes a comma list of numbers, each at least 1 (256,1024), "
                 f"got {image_tokens!r}")
    if text_tokens < 1:
        sys.exit(f"error: --text_tokens must be at least 1, got {text_tokens}")
    T = text_tokens
    print(f"KV cache (keys + values, every layer, bf16), T={T} text tokens per turn; 'over 80 GB' = first turn whose "
          "KV cache alone exceeds 80e9 bytes (weights and activations come on top)")
    for name, p in PRESETS.items():
        # one token in every layer: insertion's cache after one turn of one text token and no image
        per_token = casa.kv_cache_bytes(kv_config(name, "insertion"), 1, 1, image_tokens=0, bytes_per_value=2)
        print(f"\n{name}: {p['n_layer']} layers, {p['n_head']} heads of {p['head_dim']}, {p['n_kv_head']} K/V heads "
              f"-> {per_token / 1024:.0f} KiB per token over all layers\n"
              f"  sizes from {p['source']}")
        for N in sizes:
            print(f"  N={N} image tokens per frame")
            print(f"    {'variant':<11} {'#KV':<32} {'per turn':>11} {'after 256 turns':>16} {'over 80 GB at turn':>19}")
            for r in projection_rows(name, N, T):
                print(f"    {r['variant']:<11} {r['formula']:<32} {format_bytes(r['per_turn']):>11} "
                      f"{format_bytes(r['kv_256']):>16} {r['turn_over_budget']:>19,}")


if __name__ == "__main__":
    main()
