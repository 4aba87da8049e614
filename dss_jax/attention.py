"""T5 attention whose memory grows linearly with sequence length, on every backend, in plain JAX.

T5 adds a learned relative-position bias to the unscaled logits, and packed rows need segment masks. Neither
the bias nor the mask is ever materialized at [batch, heads, q, k]: each (query block, key block) pair builds
its own bias from the [heads, buckets] table and its mask from segment ids and positions, and an online
softmax runs over the key blocks. Each query block is a ``jax.checkpoint``: the backward pass recomputes its
scores instead of keeping them, and the bias gradient accumulates into the small table. When the query and
key lengths each fit one block the same formulas run once, which is plain dense attention.

Why not a kernel: ``jax.nn.dot_product_attention`` (cuDNN) has no packed segments in its public API, and the
Pallas TPU flash kernel wants a full [b, h, q, k] bias (see ../shared notes).
``T5Config.attention_impl = "cudnn"`` uses the cuDNN path on GPUs where the bias may be materialized (short
rows, bf16).

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
    """How to bias logits: the relative-position table (None for cross-attention) and bucketing settings."""

    bidirectional: bool = True
    num_buckets: int = 32
    max_distance: int = 128
    causal: bool = False


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


def block_bias(table: Array | None, bias: Bias, q_pos: Array, k_pos: Array, q_seg: Array, k_seg: Array) -> Array:
    """Additive float32 bias [b or 1, h or 1, q, k] of one block: relative positions, segments, causality.

    ``q_pos``/``k_pos`` are [b or 1, len] positions, ``q_seg``/``k_seg`` [b, len] segment ids (0: padding).
    A key is visible when its segment equals the query's and is not padding (and, if causal, not later).
    """
    visible = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] > 0)
    if bias.causal:
        visible = visible & (k_pos[:, None, :] <= q_pos[:, :, None])
    out = jnp.where(visible, 0.0, NEG_INF).astype(jnp.float32)[:, None]
    if table is not None:
        rel = k_pos[:, None, :] - q_pos[:, :, None]
        buckets = relative_position_bucket(rel, bias.bidirectional, bias.num_buckets, bias.max_distance)
        rp = jnp.take(table.astype(jnp.float32), buckets, axis=1)  # [h, b or 1, q, k]
        out = out + jnp.moveaxis(rp, 0, 1)
    return out


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
    q_pos: Array,
    k_pos: Array,
    q_seg: Array,
    k_seg: Array,
    *,
    q_block: int = 512,
    k_block: int = 512,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
) -> Array:
    """Softmax(q k^T + bias) v for q [b, q, h, d], k/v [b, k, h, d]; returns [b, q, h, d] in v's dtype."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq, bk = min(q_block, lq), min(k_block, lk)
    nq, nk = -(-lq // bq), -(-lk // bk)
    q_pos = jnp.broadcast_to(q_pos, (q_pos.shape[0], lq))
    k_pos = jnp.broadcast_to(k_pos, (k_pos.shape[0], lk))

    if nq == 1 and nk == 1:  # one block: dense attention with the same bias and mask
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        s = s + block_bias(table, bias, q_pos, k_pos, q_seg, k_seg)
        p = _dropout(jax.nn.softmax(s, axis=-1), dropout_rng, dropout_rate, jnp.int32(0))
        return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v)

    # pad to whole blocks: padded keys get segment 0 (never visible), padded queries are sliced off
    q, q_pos, q_seg = _pad(q, 1, nq * bq), _pad(q_pos, 1, nq * bq), _pad(q_seg, 1, nq * bq)
    k, v, k_pos, k_seg = _pad(k, 1, nk * bk), _pad(v, 1, nk * bk), _pad(k_pos, 1, nk * bk), _pad(k_seg, 1, nk * bk)

    def blocks(x: Array, n: int, size: int) -> Array:  # [b, n*size, ...] -> [n, b, size, ...]
        return jnp.moveaxis(x.reshape((x.shape[0], n, size) + x.shape[2:]), 1, 0)

    kb, vb = blocks(k, nk, bk), blocks(v, nk, bk)
    kposb, ksegb = blocks(k_pos, nk, bk), blocks(k_seg, nk, bk)

    @jax.checkpoint
    def one_query_block(qi: Array, qb: Array, qpos: Array, qseg: Array, tab: Array | None) -> Array:
        def step(carry: tuple, xs: tuple) -> tuple:
            m, denom, acc = carry
            kj, kblk, vblk, kpos, kseg = xs
            s = jnp.einsum("bqhd,bkhd->bhqk", qb, kblk, preferred_element_type=jnp.float32)
            s = s + block_bias(tab, bias, qpos, kpos, qseg, kseg)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            denom = denom * corr + jnp.sum(p, axis=-1)
            p = _dropout(p, dropout_rng, dropout_rate, qi * nk + kj)
            pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(vblk.dtype), vblk, preferred_element_type=jnp.float32)
            return (m_new, denom, acc * corr[..., None] + pv), None

        init = (
            jnp.full((b, h, bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, bq), jnp.float32),
            jnp.zeros((b, h, bq, d), jnp.float32),
        )
        (_, denom, acc), _ = jax.lax.scan(step, init, (jnp.arange(nk), kb, vb, kposb, ksegb))
        return jnp.moveaxis(acc / denom[..., None], 1, 2)  # [b, bq, h, d]

    qb, qposb, qsegb = blocks(q, nq, bq), blocks(q_pos, nq, bq), blocks(q_seg, nq, bq)
    out = jax.lax.map(lambda xs: one_query_block(xs[0], xs[1], xs[2], xs[3], table), (jnp.arange(nq), qb, qposb, qsegb))
    out = jnp.moveaxis(out, 0, 1).reshape(b, nq * bq, h, d)[:, :lq]
    return out.astype(v.dtype)


def cudnn_attention(
    q: Array, k: Array, v: Array, table: Array | None, bias: Bias, q_pos: Array, k_pos: Array, q_seg: Array, k_seg: Array
) -> Array:
    """cuDNN fused attention (NVIDIA GPUs, bf16/fp16) with T5's bias passed as a 4-D tensor, unscaled logits."""
    full = block_bias(table, bias, jnp.broadcast_to(q_pos, (q_pos.shape[0], q.shape[1])), k_pos, q_seg, k_seg)
    return jax.nn.dot_product_attention(q, k, v, bias=full.astype(q.dtype), scale=1.0, implementation="cudnn")


def resolve_impl(impl: str, dtype: str) -> str:
    """ "auto": cuDNN on a GPU in bf16/fp16 is not chosen (its bias is materialized); blockwise everywhere."""
    if impl not in IMPLS:
        raise ValueError(f"T5Config.attention_impl={impl!r}; expected one of {IMPLS}")
    if impl == "cudnn" and (jax.default_backend() != "gpu" or dtype not in ("bfloat16", "float16")):
        raise ValueError("T5Config.attention_impl='cudnn' needs an NVIDIA GPU and dtype bfloat16 or float16")
    return "blockwise" if impl == "auto" else impl
