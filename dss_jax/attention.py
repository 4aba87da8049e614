"""Attention whose memory grows linearly with sequence length, on every backend, in plain JAX.

One function serves T5 and the Gemma-based students. T5 adds a learned relative-position bias to unscaled
logits; Gemma families scale the logits, may soft-cap them (``softcap * tanh(logits / softcap)``), use
grouped-query attention (several query heads per key/value head, K/V never repeated in memory) and causal or
sliding-window masks; RoPE is applied by the caller to q and k. Packed rows need segment masks.

Neither the bias nor the mask is ever materialized at [batch, heads, q, k]: each (query block, key block) pair
builds its own bias from the [heads, buckets] table and its mask from segment ids and positions, and an online
softmax runs over the key blocks. Each query block is a ``jax.checkpoint``: the backward pass recomputes its
scores instead of keeping them, and the bias gradient accumulates into the small table. When the query and
key lengths each fit one block the same formulas run once, which is plain dense attention.

``return_lse=True`` also returns each query's log-sum-exp, so two attentions over disjoint key sets with
different masks combine exactly (``merge``): T5Gemma 2's decoder attends to its causal self keys and to the
encoder's keys in one softmax.

Why not a kernel: ``jax.nn.dot_product_attention`` (cuDNN) has no packed segments in its public API, and the
Pallas TPU flash kernel wants a full [b, h, q, k] bias (see ../shared notes).
``attention_impl = "cudnn"`` uses the cuDNN path on GPUs where the bias may be materialized (short rows, bf16).

This module imports neither TensorFlow nor seqio.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import cast

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -1e10
IMPLS = ("auto", "blockwise", "cudnn")


@dataclasses.dataclass(frozen=True)
class Bias:
    """Which keys a query sees and how its logits are biased.

    ``bidirectional``/``num_buckets``/``max_distance`` bucket T5's relative-position table (unused when the
    table is None). ``causal``: keys at later positions are hidden. ``window`` = (max_back, max_ahead): a key
    is visible only if ``-max_ahead <= q_pos - k_pos <= max_back`` (positions, so it holds in packed rows and
    in cached decoding); a causal sliding window of w tokens is ``causal=True, window=(w - 1, 0)``.
    """

    bidirectional: bool = True
    num_buckets: int = 32
    max_distance: int = 128
    causal: bool = False
    window: tuple[int, int] | None = None


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int, max_distance: int) -> Array:
    """T5's bucketing of ``key_pos - query_pos``: exact for small distances, logarithmic up to max_distance."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(relative_position)
    else:
        n = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    n_float = jnp.maximum(n, 1).astype(jnp.float32)
    large = max_exact + (jnp.log(n_float / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(
        jnp.int32
    )
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, n, large)


def visible(bias: Bias, q_pos: Array, k_pos: Array, q_seg: Array, k_seg: Array) -> Array:
    """Boolean [b, q, k]: same non-padding segment, and within the causal and window limits on positions."""
    vis = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] > 0)
    if bias.causal:
        vis = vis & (k_pos[:, None, :] <= q_pos[:, :, None])
    if bias.window is not None:
        back, ahead = bias.window
        rel = q_pos[:, :, None] - k_pos[:, None, :]
        vis = vis & (rel <= back) & (rel >= -ahead)
    return vis


def block_bias(table: Array | None, bias: Bias, q_pos: Array, k_pos: Array, q_seg: Array, k_seg: Array) -> Array:
    """Additive float32 bias [b or 1, h or 1, q, k] of one block: relative positions, segments, causality, window.

    ``q_pos``/``k_pos`` are [b or 1, len] positions, ``q_seg``/``k_seg`` [b, len] segment ids (0: padding).
    A key is visible when its segment equals the query's and is not padding, and it passes ``bias.causal`` and
    ``bias.window``.
    """
    out = jnp.where(visible(bias, q_pos, k_pos, q_seg, k_seg), 0.0, NEG_INF).astype(jnp.float32)[:, None]
    if table is not None:
        rel = k_pos[:, None, :] - q_pos[:, :, None]
        buckets = relative_position_bucket(rel, bias.bidirectional, bias.num_buckets, bias.max_distance)
        rp = jnp.take(table.astype(jnp.float32), buckets, axis=1)  # [h, b or 1, q, k]
        out = out + jnp.moveaxis(rp, 0, 1)
    return out


def _grouped_bias(x: Array, hkv: int, g: int) -> Array:
    """[b or 1, h or 1, q, k] -> [b or 1, hkv or 1, g * q, k]: each kv head's g query heads stacked along q."""
    if x.shape[1] == 1:
        if g == 1:
            return x
        return jnp.broadcast_to(x[:, :, None], (x.shape[0], 1, g) + x.shape[2:]).reshape(x.shape[0], 1, -1, x.shape[3])
    return x.reshape(x.shape[0], hkv, -1, x.shape[3])


def _heads_first(x: Array) -> Array:
    """[b, len, h, d] -> [b, h, len, d]. The attention contractions take operands with (batch, heads) leading:
    XLA:CPU runs a dot whose batch axes are not the leading ones several times slower than the transpose and a
    dot with leading batch axes (docs/performance.md); on TPU the transpose is a layout."""
    return jnp.swapaxes(x, 1, 2)


def _scores(q: Array, k: Array, scale: float, softcap: float | None) -> Array:
    """float32 logits [b, hkv, g * q, k] of q [b, q, hkv, g, d] and k [b, k, hkv, d], scaled and soft-capped.

    The g query heads that share a kv head are stacked along the query axis, so K/V are read once per kv head.
    """
    b, lq, hkv, g, d = q.shape
    qh = jnp.moveaxis(q, 1, 3).reshape(b, hkv, g * lq, d)  # [b, hkv, g * q, d]: heads lead, as _heads_first says
    s = jnp.einsum("bhqd,bhkd->bhqk", qh, _heads_first(k), preferred_element_type=jnp.float32)
    if scale != 1.0:
        s = s * scale
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    return s


def _ungroup(x: Array, g: int) -> Array:
    """[b, hkv, g * q, ...] -> [b, q, hkv * g, ...]: back to the caller's head layout."""
    b, hkv = x.shape[:2]
    x = x.reshape((b, hkv, g, -1) + x.shape[3:])
    x = jnp.moveaxis(x, 3, 1)
    return x.reshape((b, x.shape[1], hkv * g) + x.shape[4:])


def _dropout(p: Array, rng: Array | None, rate: float, salt: Array) -> Array:
    if rng is None or rate <= 0:
        return p
    keep = jax.random.bernoulli(jax.random.fold_in(rng, salt), 1.0 - rate, p.shape)
    return jnp.where(keep, p / (1.0 - rate), 0.0)


def _pad(x: Array, axis: int, size: int, value: int = 0) -> Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _block_extent(pos: Array, seg: Array, n: int, size: int) -> tuple[Array, ...]:
    """Per block [b, n]: lowest and highest real (non-padding) segment id and position; empty blocks get a
    lowest above every highest, so every overlap test with them fails."""
    seg = seg.reshape(seg.shape[0], n, size)
    pos = jnp.broadcast_to(pos, (seg.shape[0], n * size)).reshape(seg.shape)
    real = seg > 0
    big = jnp.int32(2**30)
    return (
        jnp.min(jnp.where(real, seg, big), -1),
        jnp.max(jnp.where(real, seg, -big), -1),
        jnp.min(jnp.where(real, pos, big), -1),
        jnp.max(jnp.where(real, pos, -big), -1),
    )


def block_pairs(bias: Bias, q_pos: Array, k_pos: Array, q_seg: Array, k_seg: Array, q_block: int, k_block: int) -> Array:
    """Boolean [b, nq, nk]: may any query of query block i see any key of key block j in that row?

    Tests the blocks' segment-id ranges for overlap (exact for packed rows, whose segments are contiguous and
    increasing; a superset otherwise) and their position ranges against the causal and window limits.
    Lengths must be whole blocks.
    """
    nq, nk = q_seg.shape[1] // q_block, k_seg.shape[1] // k_block
    qs0, qs1, qp0, qp1 = (x[:, :, None] for x in _block_extent(q_pos, q_seg, nq, q_block))
    ks0, ks1, kp0, kp1 = (x[:, None, :] for x in _block_extent(k_pos, k_seg, nk, k_block))
    ok = (qs0 <= ks1) & (ks0 <= qs1)
    if bias.causal:
        ok = ok & (kp0 <= qp1)
    if bias.window is not None:
        back, ahead = bias.window
        ok = ok & (qp1 - kp0 >= -ahead) & (qp0 - kp1 <= back)
    return ok


def static_ranges(bias: Bias, lq: int, nq: int, bq: int, nk: int, bk: int) -> list[tuple[int, int]]:
    """For positions 0..len-1 in every row: per query block, the first and last key block the causal and window
    limits let any of its queries see (first > last: none)."""
    back = bias.window[0] if bias.window is not None else None
    ahead = bias.window[1] if bias.window is not None else None
    if bias.causal:
        ahead = 0 if ahead is None else min(ahead, 0)
    out = []
    for i in range(nq):
        first, last = i * bq, min((i + 1) * bq, lq) - 1
        lo = 0 if back is None else max(0, (first - back) // bk)
        hi = nk - 1 if ahead is None else min(nk - 1, (last + ahead) // bk)
        out.append((lo, hi))
    return out


SKIPS = ("auto", "rows", "batch", "none")


def _positions(pos: Array | None, length: int) -> Array:
    """[b or 1, length] positions; None: 0..length-1 in every row."""
    pos = jnp.arange(length, dtype=jnp.int32)[None] if pos is None else pos
    return jnp.broadcast_to(pos, (pos.shape[0], length))


@dataclasses.dataclass(frozen=True)
class _Grid:
    """The static layout of one blockwise call: the mask and logit settings, head grouping, block sizes."""

    bias: Bias
    scale: float
    softcap: float | None
    dropout_rate: float
    hkv: int
    g: int
    d: int
    bq: int
    nq: int
    bk: int
    nk: int


def _blocks(x: Array, n: int, size: int) -> Array:
    """[b, n*size, ...] -> [n, b, size, ...]."""
    return jnp.moveaxis(x.reshape((x.shape[0], n, size) + x.shape[2:]), 1, 0)


def _dense(
    q: Array, k: Array, v: Array, table: Array | None, bias: Bias, pos: tuple[Array, Array, Array, Array], grid: _Grid,
    rng: Array | None, return_lse: bool,
) -> Array | tuple[Array, Array]:  # fmt: skip
    """One query block and one key block: plain dense attention with the same bias and mask."""
    hkv, g = grid.hkv, grid.g
    s = _scores(q, k, grid.scale, grid.softcap) + _grouped_bias(block_bias(table, bias, *pos), hkv, g)
    p = _dropout(jax.nn.softmax(s, axis=-1), rng, grid.dropout_rate, jnp.int32(0))
    out = _ungroup(jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), _heads_first(v)), g)
    return (out, _ungroup(jax.nn.logsumexp(s, axis=-1), g)) if return_lse else out


def _online_step(
    grid: _Grid, rng: Array | None, qi: Array, qb: Array, qpos: Array, qseg: Array, tab: Array | None, carry: tuple, xs: tuple
) -> tuple:
    """One key block of the online softmax: running max ``m``, denominator and unnormalized output."""
    m, denom, acc = carry
    kj, kblk, vblk, kpos, kseg = xs
    s = _scores(qb, kblk, grid.scale, grid.softcap)
    s = s + _grouped_bias(block_bias(tab, grid.bias, qpos, kpos, qseg, kseg), grid.hkv, grid.g)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m - m_new)
    denom = denom * corr + jnp.sum(p, axis=-1)
    p = _dropout(p, rng, grid.dropout_rate, qi * grid.nk + kj)
    pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(vblk.dtype), _heads_first(vblk), preferred_element_type=jnp.float32)
    return m_new, denom, acc * corr[..., None] + pv


def _query_block(
    grid: _Grid, rng: Array | None, qi: Array, qb: Array, qpos: Array, qseg: Array,
    kj: Array, kb: Array, vb: Array, kposb: Array, ksegb: Array, vis: Array | None, tab: Array | None,
) -> tuple[Array, Array]:  # fmt: skip
    """One query block against its key blocks ``kj`` (``vis``: which to compute): [bb, bq, hq, d], [bb, bq, hq]."""
    compute = functools.partial(_online_step, grid, rng, qi, qb, qpos, qseg, tab)

    def step(carry: tuple, xs: tuple) -> tuple:
        if vis is None:
            return compute(carry, xs), None
        # the skipped branch must not write the computed branch's residuals (zeros the size of the
        # block's scores, each step): checkpointed, the block's residuals are only its inputs
        return jax.lax.cond(xs[-1], jax.checkpoint(compute), lambda c, _: c, carry, xs[:-1]), None

    bb, rows = qb.shape[0], grid.g * grid.bq
    init = (
        jnp.full((bb, grid.hkv, rows), -jnp.inf, jnp.float32),
        jnp.zeros((bb, grid.hkv, rows), jnp.float32),
        jnp.zeros((bb, grid.hkv, rows, grid.d), jnp.float32),
    )
    xs = (kj, kb, vb, kposb, ksegb) + (() if vis is None else (vis,))
    (m, denom, acc), _ = jax.lax.scan(step, init, xs)
    if vis is None:  # every row saw a key block, so denom > 0
        out, lse = acc / denom[..., None], m + jnp.log(denom)
    else:  # queries that saw nothing (padding) give 0 and a log-sum-exp of NEG_INF
        seen = denom > 0
        safe = jnp.where(seen, denom, 1.0)
        out, lse = acc / safe[..., None], jnp.where(seen, m + jnp.log(safe), NEG_INF)
    out = jnp.moveaxis(out, 1, 2) if grid.g == 1 else _ungroup(out, grid.g)
    return out, _ungroup(lse, grid.g)


def _range_block(
    block: Callable[..., tuple[Array, Array]], kv: tuple[Array, ...], visit: Array | None, table: Array | None,
    nk: int, width: int, xs: tuple,
) -> tuple[Array, Array]:  # fmt: skip
    """One query block over the ``width`` key blocks from its range's first (``xs``: index, first, q blocks)."""
    qi, lo, qb, qpos, qseg = xs
    keys = (jnp.arange(nk),) + kv
    vis = None if visit is None else visit[qi]
    if width < nk:
        keys = tuple(jax.lax.dynamic_slice_in_dim(x, lo, width) for x in keys)
        vis = None if vis is None else jax.lax.dynamic_slice_in_dim(vis, lo, width)
    return block(qi, qb, qpos, qseg, *keys, vis, table)


def _run(
    grid: _Grid, ranges: list[tuple[int, int]], table: Array | None, rng: Array | None,
    q: Array, q_pos: Array, q_seg: Array, k: Array, v: Array, k_pos: Array, k_seg: Array, visit: Array | None,
) -> tuple[Array, Array]:  # fmt: skip
    """All query blocks of rows [bb, ...]; ``visit`` [nq, nk] says which block pairs to compute."""
    bb, nq, nk, hq = q.shape[0], grid.nq, grid.nk, grid.hkv * grid.g
    kv = tuple(_blocks(x, nk, grid.bk) for x in (k, v, k_pos, k_seg))
    queries = tuple(_blocks(x, nq, grid.bq) for x in (q, q_pos, q_seg))
    block = jax.checkpoint(functools.partial(_query_block, grid, rng))
    outs: dict[int, tuple[Array, Array]] = {}
    for width in sorted({hi - lo + 1 for lo, hi in ranges}):
        idx = [i for i, (lo, hi) in enumerate(ranges) if hi - lo + 1 == width]
        if width <= 0:  # no key block in range: nothing visible
            empty = (jnp.zeros((bb, grid.bq, hq, grid.d), jnp.float32), jnp.full((bb, grid.bq, hq), NEG_INF, jnp.float32))
            outs.update((i, empty) for i in idx)
            continue
        one = functools.partial(_range_block, block, kv, visit, table, nk, width)
        los = jnp.asarray([ranges[i][0] for i in idx], jnp.int32)
        if len(idx) == nq:  # every query block alike (the T5 case): map over them in order
            res = jax.lax.map(one, (jnp.arange(nq), los) + queries)
            break
        take = jnp.asarray(idx, jnp.int32)
        res = jax.lax.map(one, (take, los) + tuple(x[take] for x in queries))
        outs.update((i, (res[0][n], res[1][n])) for n, i in enumerate(idx))
    else:
        res = (jnp.stack([outs[i][0] for i in range(nq)]), jnp.stack([outs[i][1] for i in range(nq)]))
    out, lse = res
    return jnp.moveaxis(out, 0, 1).reshape(bb, nq * grid.bq, hq, grid.d), jnp.moveaxis(lse, 0, 1).reshape(bb, nq * grid.bq, hq)


def attention(
    q: Array, k: Array, v: Array, table: Array | None, bias: Bias,
    q_pos: Array | None, k_pos: Array | None, q_seg: Array, k_seg: Array, *,
    q_block: int = 512, k_block: int = 512, dropout_rng: Array | None = None, dropout_rate: float = 0.0,
    scale: float = 1.0, softcap: float | None = None, return_lse: bool = False, skip: str = "auto",
) -> Array | tuple[Array, Array]:  # fmt: skip
    """softmax(softcap(scale * q k^T) + bias + mask) v, block by block, visiting only blocks a query can see.

    q [b, lq, hq, d]; k, v [b, lk, hkv, d] with hq a multiple of hkv (query head i reads kv head i // (hq/hkv)).
    ``table`` [hq, buckets] is T5's relative-position table or None. Positions are [b or 1, len]; None means
    0..len-1 in every row, which lets each query block visit only the key blocks the causal and window limits
    allow (a static range: no work, no memory for the rest). Segment ids [b, len] (0: padding).

    ``skip`` drops, at run time, key blocks that no query of a query block can see (other segments, padding,
    beyond the causal or window limits by position): "rows" decides per row (rows loop one at a time),
    "batch" per block pair across the whole batch, "none" computes every pair in range; "auto" is "rows" with
    several query blocks (training, encoding: packed rows differ) and "batch" with one (a decode step: the
    cache's unwritten blocks are the same in every row). Queries that see no key return 0 (they are padding).

    Returns [b, lq, hq, d] in v's dtype, and with ``return_lse`` also the float32 log-sum-exp of each query's
    logits [b, lq, hq] (see ``merge``).
    """
    if skip not in SKIPS:
        raise ValueError(f"attention: skip={skip!r}; expected one of {SKIPS}")
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"attention: {hq} query heads are not a multiple of {hkv} key/value heads")
    g = hq // hkv
    q = q.reshape(b, lq, hkv, g, d)
    bq, bk = min(q_block, lq), min(k_block, lk)
    nq, nk = -(-lq // bq), -(-lk // bk)
    grid = _Grid(bias, scale, softcap, dropout_rate, hkv, g, d, bq, nq, bk, nk)
    aranged = q_pos is None and k_pos is None
    q_pos, k_pos = _positions(q_pos, lq), _positions(k_pos, lk)
    if nq == 1 and nk == 1:
        return _dense(q, k, v, table, bias, (q_pos, k_pos, q_seg, k_seg), grid, dropout_rng, return_lse)

    # pad to whole blocks: padded keys get segment 0 (never visible), padded queries are sliced off
    q, q_pos, q_seg = _pad(q, 1, nq * bq), _pad(q_pos, 1, nq * bq), _pad(q_seg, 1, nq * bq)
    k, v, k_pos, k_seg = _pad(k, 1, nk * bk), _pad(v, 1, nk * bk), _pad(k_pos, 1, nk * bk), _pad(k_seg, 1, nk * bk)
    ranges = static_ranges(bias, lq, nq, bq, nk, bk) if aranged else [(0, nk - 1)] * nq
    if skip == "auto":
        skip = "rows" if nq > 1 else "batch"
    pairs = None if skip == "none" else block_pairs(bias, q_pos, k_pos, q_seg, k_seg, bq, bk)  # [b, nq, nk]
    if skip == "rows":
        pos_q, pos_k = jnp.broadcast_to(q_pos, (b, nq * bq)), jnp.broadcast_to(k_pos, (b, nk * bk))

        def row(xs: tuple) -> tuple[Array, Array]:
            r, rq, rqp, rqs, rk, rv, rkp, rks, visit = xs
            rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, r)
            out, lse = _run(
                grid, ranges, table, rng, rq[None], rqp[None], rqs[None], rk[None], rv[None], rkp[None], rks[None], visit
            )
            return out[0], lse[0]

        out, lse = jax.lax.map(row, (jnp.arange(b), q, pos_q, q_seg, k, v, pos_k, k_seg, pairs))
    else:
        visit = None if pairs is None else jnp.any(pairs, axis=0)
        out, lse = _run(grid, ranges, table, dropout_rng, q, q_pos, q_seg, k, v, k_pos, k_seg, visit)
    out = out[:, :lq].astype(v.dtype)
    return (out, lse[:, :lq]) if return_lse else out


def merge(parts: list[tuple[Array, Array]]) -> tuple[Array, Array]:
    """One softmax over the union of several attentions' disjoint key sets, from each (out, lse) pair.

    Each ``out`` [b, q, h, d] is normalized over its own keys; weighting by exp(lse_i - logsumexp_i lse_i)
    gives exactly the attention over all keys, each key set with its own mask.
    """
    lse = jax.nn.logsumexp(jnp.stack([part_lse for _, part_lse in parts]), axis=0)
    out = cast(Array, sum(o.astype(jnp.float32) * jnp.exp(part_lse - lse)[..., None] for o, part_lse in parts))
    return out.astype(parts[0][0].dtype), lse


def cudnn_attention(
    q: Array, k: Array, v: Array, table: Array | None, bias: Bias,
    q_pos: Array | None, k_pos: Array | None, q_seg: Array, k_seg: Array, *,
    scale: float = 1.0, softcap: float | None = None, return_lse: bool = False,
) -> Array:  # fmt: skip
    """cuDNN fused attention (NVIDIA GPUs, bf16/fp16) with the bias and masks passed as one 4-D tensor.

    Grouped-query heads go to cuDNN as they are; causal and window masks are part of the materialized bias.
    It has no logit soft-capping and returns no log-sum-exp: those raise.
    """
    if softcap is not None:
        raise ValueError("attention_impl='cudnn' has no attention-logit softcapping; use attention_impl='blockwise'")
    if return_lse:
        raise ValueError("attention_impl='cudnn' returns no log-sum-exp (merged attention); use attention_impl='blockwise'")
    lq, lk = q.shape[1], k.shape[1]
    full = block_bias(table, bias, _positions(q_pos, lq), _positions(k_pos, lk), q_seg, k_seg)
    return jax.nn.dot_product_attention(q, k, v, bias=full.astype(q.dtype), scale=scale, implementation="cudnn")


def resolve_impl(impl: str, dtype: str) -> str:
    """ "auto": cuDNN on a GPU in bf16/fp16 is not chosen (its bias is materialized); blockwise everywhere."""
    if impl not in IMPLS:
        raise ValueError(f"T5Config.attention_impl={impl!r}; expected one of {IMPLS}")
    if impl == "cudnn" and (jax.default_backend() != "gpu" or dtype not in ("bfloat16", "float16")):
        raise ValueError("T5Config.attention_impl='cudnn' needs an NVIDIA GPU and dtype bfloat16 or float16")
    return "blockwise" if impl == "auto" else impl
