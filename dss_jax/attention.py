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
import math

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


def _scores(q: Array, k: Array, scale: float, softcap: float | None) -> Array:
    """float32 logits [b, hkv, g * q, k] of q [b, q, hkv, g, d] and k [b, k, hkv, d], scaled and soft-capped.

    The g query heads that share a kv head are stacked along the query axis, so K/V are read once per kv head.
    """
    if q.shape[3] == 1:  # one query head per kv head (T5): the plain multi-head contraction
        s = jnp.einsum("bqhd,bkhd->bhqk", q[:, :, :, 0], k, preferred_element_type=jnp.float32)
    else:
        s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32)
        s = s.reshape(s.shape[0], s.shape[1], -1, s.shape[4])
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


def attention(
    q: Array,
    k: Array,
    v: Array,
    table: Array | None,
    bias: Bias,
    q_pos: Array | None,
    k_pos: Array | None,
    q_seg: Array,
    k_seg: Array,
    *,
    q_block: int = 512,
    k_block: int = 512,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    scale: float = 1.0,
    softcap: float | None = None,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """softmax(softcap(scale * q k^T) + bias + mask) v, block by block.

    q [b, lq, hq, d]; k, v [b, lk, hkv, d] with hq a multiple of hkv (query head i reads kv head i // (hq/hkv)).
    ``table`` [hq, buckets] is T5's relative-position table or None. Positions are [b or 1, len] (None: arange),
    segment ids [b, len] (0: padding). Returns [b, lq, hq, d] in v's dtype, and with ``return_lse`` also the
    float32 log-sum-exp of each query's logits [b, lq, hq] (see ``merge``).
    """
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"attention: {hq} query heads are not a multiple of {hkv} key/value heads")
    g = hq // hkv
    q = q.reshape(b, lq, hkv, g, d)
    bq, bk = min(q_block, lq), min(k_block, lk)
    nq, nk = -(-lq // bq), -(-lk // bk)
    q_pos = jnp.arange(lq, dtype=jnp.int32)[None] if q_pos is None else q_pos
    k_pos = jnp.arange(lk, dtype=jnp.int32)[None] if k_pos is None else k_pos
    q_pos = jnp.broadcast_to(q_pos, (q_pos.shape[0], lq))
    k_pos = jnp.broadcast_to(k_pos, (k_pos.shape[0], lk))

    if nq == 1 and nk == 1:  # one block: dense attention with the same bias and mask
        s = _scores(q, k, scale, softcap) + _grouped_bias(block_bias(table, bias, q_pos, k_pos, q_seg, k_seg), hkv, g)
        p = _dropout(jax.nn.softmax(s, axis=-1), dropout_rng, dropout_rate, jnp.int32(0))
        if g == 1:
            out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v)
        else:
            out = _ungroup(jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), v), g)
        return (out, _ungroup(jax.nn.logsumexp(s, axis=-1), g)) if return_lse else out

    # pad to whole blocks: padded keys get segment 0 (never visible), padded queries are sliced off
    q, q_pos, q_seg = _pad(q, 1, nq * bq), _pad(q_pos, 1, nq * bq), _pad(q_seg, 1, nq * bq)
    k, v, k_pos, k_seg = _pad(k, 1, nk * bk), _pad(v, 1, nk * bk), _pad(k_pos, 1, nk * bk), _pad(k_seg, 1, nk * bk)

    def blocks(x: Array, n: int, size: int) -> Array:  # [b, n*size, ...] -> [n, b, size, ...]
        return jnp.moveaxis(x.reshape((x.shape[0], n, size) + x.shape[2:]), 1, 0)

    kb, vb = blocks(k, nk, bk), blocks(v, nk, bk)
    kposb, ksegb = blocks(k_pos, nk, bk), blocks(k_seg, nk, bk)

    @jax.checkpoint
    def one_query_block(qi: Array, qb: Array, qpos: Array, qseg: Array, tab: Array | None) -> tuple[Array, Array]:
        def step(carry: tuple, xs: tuple) -> tuple:
            m, denom, acc = carry
            kj, kblk, vblk, kpos, kseg = xs
            s = _scores(qb, kblk, scale, softcap)
            s = s + _grouped_bias(block_bias(tab, bias, qpos, kpos, qseg, kseg), hkv, g)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            denom = denom * corr + jnp.sum(p, axis=-1)
            p = _dropout(p, dropout_rng, dropout_rate, qi * nk + kj)
            pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(vblk.dtype), vblk, preferred_element_type=jnp.float32)
            return (m_new, denom, acc * corr[..., None] + pv), None

        init = (
            jnp.full((b, hkv, g * bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, hkv, g * bq), jnp.float32),
            jnp.zeros((b, hkv, g * bq, d), jnp.float32),
        )
        (m, denom, acc), _ = jax.lax.scan(step, init, (jnp.arange(nk), kb, vb, kposb, ksegb))
        out = jnp.moveaxis(acc / denom[..., None], 1, 2) if g == 1 else _ungroup(acc / denom[..., None], g)
        return out, _ungroup(m + jnp.log(denom), g)  # [b, bq, hq, d], [b, bq, hq]

    qb, qposb, qsegb = blocks(q, nq, bq), blocks(q_pos, nq, bq), blocks(q_seg, nq, bq)
    out, lse = jax.lax.map(lambda xs: one_query_block(xs[0], xs[1], xs[2], xs[3], table), (jnp.arange(nq), qb, qposb, qsegb))
    out = jnp.moveaxis(out, 0, 1).reshape(b, nq * bq, hq, d)[:, :lq].astype(v.dtype)
    if not return_lse:
        return out
    return out, jnp.moveaxis(lse, 0, 1).reshape(b, nq * bq, hq)[:, :lq]


def merge(parts: list[tuple[Array, Array]]) -> tuple[Array, Array]:
    """One softmax over the union of several attentions' disjoint key sets, from each (out, lse) pair.

    Each ``out`` [b, q, h, d] is normalized over its own keys; weighting by exp(lse_i - logsumexp_i lse_i)
    gives exactly the attention over all keys, each key set with its own mask.
    """
    lse = jax.nn.logsumexp(jnp.stack([part_lse for _, part_lse in parts]), axis=0)
    out = sum(o.astype(jnp.float32) * jnp.exp(part_lse - lse)[..., None] for o, part_lse in parts)
    return out.astype(parts[0][0].dtype), lse


def cudnn_attention(
    q: Array,
    k: Array,
    v: Array,
    table: Array | None,
    bias: Bias,
    q_pos: Array | None,
    k_pos: Array | None,
    q_seg: Array,
    k_seg: Array,
    *,
    scale: float = 1.0,
    softcap: float | None = None,
    return_lse: bool = False,
) -> Array:
    """cuDNN fused attention (NVIDIA GPUs, bf16/fp16) with the bias and masks passed as one 4-D tensor.

    Grouped-query heads go to cuDNN as they are; causal and window masks are part of the materialized bias.
    It has no logit soft-capping and returns no log-sum-exp: those raise.
    """
    if softcap is not None:
        raise ValueError("attention_impl='cudnn' has no attention-logit softcapping; use attention_impl='blockwise'")
    if return_lse:
        raise ValueError("attention_impl='cudnn' returns no log-sum-exp (merged attention); use attention_impl='blockwise'")
    lq, lk = q.shape[1], k.shape[1]
    q_pos = jnp.arange(lq, dtype=jnp.int32)[None] if q_pos is None else jnp.broadcast_to(q_pos, (q_pos.shape[0], lq))
    k_pos = jnp.arange(lk, dtype=jnp.int32)[None] if k_pos is None else jnp.broadcast_to(k_pos, (k_pos.shape[0], lk))
    full = block_bias(table, bias, q_pos, k_pos, q_seg, k_seg)
    return jax.nn.dot_product_attention(q, k, v, bias=full.astype(q.dtype), scale=scale, implementation="cudnn")


def resolve_impl(impl: str, dtype: str) -> str:
    """ "auto": cuDNN on a GPU in bf16/fp16 is not chosen (its bias is materialized); blockwise everywhere."""
    if impl not in IMPLS:
        raise ValueError(f"T5Config.attention_impl={impl!r}; expected one of {IMPLS}")
    if impl == "cudnn" and (jax.default_backend() != "gpu" or dtype not in ("bfloat16", "float16")):
        raise ValueError("T5Config.attention_impl='cudnn' needs an NVIDIA GPU and dtype bfloat16 or float16")
    return "blockwise" if impl == "auto" else impl
