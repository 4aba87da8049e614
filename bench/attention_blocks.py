"""Attention forward + backward on packed rows: dense vs every block pair vs skipping unseen blocks; prints JSON.

Rows are packed like the paper recipe's: examples of 100-250 tokens back to back (about 4-5 per 1024-token
row), then padding. For each block size the score entries computed per call (batch x heads x q x k, counting
whole blocks) are reported beside the entries a query can actually see.

python bench/attention_blocks.py --batch 8 --length 1024 --blocks 128 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dss_jax import attention as attn


def packed_rows(rng: np.random.Generator, batch: int, length: int, lo: int, hi: int) -> np.ndarray:
    """Segment ids [batch, length]: examples of lo..hi tokens packed until the next one does not fit."""
    seg = np.zeros((batch, length), np.int32)
    for r in range(batch):
        start, sid = 0, 1
        while True:
            n = int(rng.integers(lo, hi + 1))
            if start + n > length:
                break
            seg[r, start : start + n] = sid
            start, sid = start + n, sid + 1
    return seg


def entries(pairs: np.ndarray, skip: str, bq: int, bk: int, heads: int, ranges: list[tuple[int, int]]) -> int:
    """Score entries computed: every in-range block pair, per row ("rows"), or where any row needs it ("batch")."""
    in_range = np.zeros(pairs.shape[1:], bool)
    for i, (lo, hi) in enumerate(ranges):
        in_range[i, lo : hi + 1] = True
    if skip == "none":
        used = np.broadcast_to(in_range, pairs.shape)
    elif skip == "rows":
        used = pairs & in_range
    else:
        used = np.broadcast_to(pairs.any(0) & in_range, pairs.shape)
    return int(used.sum()) * bq * bk * heads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=8, help="fewer than --heads: grouped-query attention")
    p.add_argument("--d_kv", type=int, default=64)
    p.add_argument("--segment", type=int, nargs=2, default=(100, 250), help="example lengths, min max")
    p.add_argument("--blocks", type=int, nargs="+", default=(128, 256))
    p.add_argument("--causal", action="store_true", help="decoder self-attention (default: encoder, bidirectional)")
    p.add_argument("--window", type=int, nargs=2, default=None, help="max_back max_ahead")
    p.add_argument("--no_table", action="store_true", help="no T5 relative-position table (Gemma families)")
    p.add_argument("--aranged", action="store_true", help="positions None (0..len-1): static key-block ranges")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    b, n, h, hkv, d = a.batch, a.length, a.heads, a.kv_heads, a.d_kv
    seg = jnp.asarray(packed_rows(rng, b, n, *a.segment))
    q = jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, n, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, n, hkv, d)), jnp.float32)
    table = None if a.no_table else jnp.asarray(rng.normal(size=(h, 32)) * 0.1, jnp.float32)
    bias = attn.Bias(not a.causal, 32, 128, a.causal, tuple(a.window) if a.window else None)
    pos = None if a.aranged else jnp.arange(n, dtype=jnp.int32)[None]
    full_pos = jnp.arange(n, dtype=jnp.int32)[None]
    visible = int(jnp.sum(attn.visible(bias, full_pos, full_pos, seg, seg))) * h
    out = {
        "batch": b, "length": n, "heads": h, "kv_heads": hkv, "d_kv": d, "segment_lengths": list(a.segment),
        "segments_per_row": round(float(np.mean(np.max(np.asarray(seg), 1))), 2),
        "padding": round(float(np.mean(np.asarray(seg) == 0)), 4), "causal": a.causal, "window": a.window,
        "table": table is not None, "aranged_positions": a.aranged, "backend": jax.default_backend(),
        "visible_score_entries": visible, "runs": [],
    }  # fmt: skip
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def timed(block: int, skip: str) -> dict:
        def loss(q, k, v, t):
            o = attn.attention(q, k, v, t, bias, pos, pos, seg, seg, q_block=block, k_block=block, skip=skip)
            return jnp.sum(o * w)

        f = jax.jit(jax.grad(loss, (0, 1, 2) if table is None else (0, 1, 2, 3)))
        t0 = time.perf_counter()
        jax.block_until_ready(f(q, k, v, table))
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            jax.block_until_ready(f(q, k, v, table))
            times.append(time.perf_counter() - t0)
        return {"compile_and_first_s": round(compile_s, 3), "median_s": round(statistics.median(times), 4),
                "best_s": round(min(times), 4)}  # fmt: skip

    run = {"impl": "dense", "block": n, "skip": "none", "score_entries": b * h * n * n, **timed(n, "none")}
    out["runs"].append(run)
    print(json.dumps(run), flush=True)
    for block in a.blocks:
        nb = -(-n // block)
        padded = _pad_to(seg, nb * block)
        pairs = np.asarray(attn.block_pairs(bias, _pad_to(full_pos, nb * block), _pad_to(full_pos, nb * block),
                                            padded, padded, block, block))  # fmt: skip
        ranges = attn.static_ranges(bias, n, nb, block, nb, block) if a.aranged else [(0, nb - 1)] * nb
        for skip in ("none", "batch", "rows"):
            run = {"impl": "blockwise", "block": block, "skip": skip,
                   "score_entries": entries(pairs, skip, block, block, h, ranges), **timed(block, skip)}  # fmt: skip
            out["runs"].append(run)
            print(json.dumps(run), flush=True)
    print(json.dumps(out))


def _pad_to(x: jax.Array, size: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, size - x.shape[1])))


if __name__ == "__main__":
    main()
