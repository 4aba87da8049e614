"""The layers of the T5Gemma and T5Gemma 2 students (``dss_jax.gemma`` has their configs and the encoder-decoder).

Norms, the scaled embedding, rotary embeddings, GeGLU, grouped-query attention of the four kinds and one
encoder or decoder layer with sandwich norms; ``run_layers`` stacks them, unscanned or scanned.
This module imports neither TensorFlow nor seqio.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from dss_jax import attention as attn
from dss_jax.model import (
    Dense,
    _constrain,
    _dtype,
    _remat,
    cached_cross_kv,
    cached_self_kv,
    named_param,
    per_input_cross,
    token_matmul,
)

if TYPE_CHECKING:
    from dss_jax.gemma import GemmaConfig, GemmaStack

Array = jax.Array


def _attend(cfg: GemmaConfig, q: Array, k: Array, v: Array, bias: attn.Bias, pos: tuple, rng: Array | None, **kw: Any) -> Any:
    """``dss_jax.attention`` with the config's implementation (cuDNN only where asked for and without dropout)."""
    impl = attn.resolve_impl(cfg.attention_impl, cfg.dtype)
    if impl == "cudnn" and rng is None:
        return attn.cudnn_attention(
            q, k, v, None, bias, *pos, scale=kw["scale"], softcap=kw["softcap"], return_lse=kw["return_lse"]
        )
    return attn.attention(
        q,
        k,
        v,
        None,
        bias,
        *pos,
        q_block=cfg.attention_q_block,
        k_block=cfg.attention_k_block,
        dropout_rng=rng,
        dropout_rate=cfg.attention_dropout,
        skip=cfg.attention_skip,
        **kw,
    )


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + w)`` in float32, ``w`` initialised to 0."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = named_param(self, "scale", nn.initializers.zeros, (self.axis_name,), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (y * (1.0 + w.astype(jnp.float32))).astype(self.dtype)


class GemmaEmbed(nn.Module):
    """Token embedding scaled by sqrt(hidden_size) (in the activation dtype, as Hugging Face rounds it); with
    ``eoi_token_index`` (T5Gemma 2) that id reads the learned ``eoi_embedding`` instead."""

    num_embeddings: int
    features: int
    eoi_token_index: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        # std 1/sqrt(d): the sqrt(d)-scaled embedding has unit entries, and the tied head's logits unit std
        init = nn.initializers.normal(self.features**-0.5)
        self.embedding = named_param(
            self, "embedding", init, ("vocab", "embed"), (self.num_embeddings, self.features), self.param_dtype
        )
        if self.eoi_token_index is not None:
            self.eoi_embedding = named_param(
                self, "eoi_embedding", nn.initializers.zeros, ("embed",), (self.features,), self.param_dtype
            )

    def __call__(self, tokens: Array) -> Array:
        x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
        x = x * jnp.asarray(self.features**0.5, self.dtype)
        if self.eoi_token_index is not None:
            x = jnp.where((tokens == self.eoi_token_index)[..., None], self.eoi_embedding.astype(self.dtype), x)
        return x

    def attend(self, x: Array) -> Array:
        return token_matmul(x.astype(self.dtype), self.embedding.astype(self.dtype), "nd,vd->nv")


def rope_tables(positions: Array, head_dim: int, theta: float, dtype: Any, factor: float = 1.0) -> tuple[Array, Array]:
    """cos, sin [b or 1, len, head_dim] as Hugging Face computes them (float32 angles, cast to ``dtype``)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if factor != 1.0:
        inv_freq = inv_freq / factor
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x [b, len, heads, d] rotated by half-split pairs (Hugging Face's ``rotate_half``)."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


def _pick(flag: Any, a: Any, b: Any) -> Any:
    """``a`` where the layer is sliding, else ``b``: statically for a Python bool, elementwise for a traced one."""
    if isinstance(flag, bool):
        return a if flag else b
    return jax.tree.map(lambda x, y: jnp.where(flag, x, y), a, b)


def _cond(flag: Any, f_sliding: Any, f_full: Any, *ops: Any) -> Any:
    """Runs one of two pure functions by the layer type (``jax.lax.cond`` when the type is a scanned flag)."""
    if isinstance(flag, bool):
        return f_sliding(*ops) if flag else f_full(*ops)
    return jax.lax.cond(flag, f_sliding, f_full, *ops)


class GemmaMLP(nn.Module):
    """GeGLU: ``down(gelu_tanh(gate(x)) * up(x))``."""

    config: GemmaConfig
    stack: GemmaStack

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        cfg, s = self.config, self.stack
        dense = functools.partial(Dense, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype))
        h = jax.nn.gelu(dense(s.intermediate_size, ("embed", "mlp"), name="gate_proj")(x), approximate=True)
        h = h * dense(s.intermediate_size, ("embed", "mlp"), name="up_proj")(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        return dense(s.hidden_size, ("mlp", "embed"), name="down_proj")(h)


class GemmaAttention(nn.Module):
    """Grouped-query attention with RoPE; ``kind`` is "encoder" (bidirectional), "causal" (decoder self),
    "cross" (T5Gemma) or "merged" (T5Gemma 2: causal self part and cross part under one softmax).

    Cache variables follow ``dss_jax.model.Attention``: ``cached_key``/``cached_value``/``cache_index`` for the
    decoder's own keys (rotated), ``cross_key``/``cross_value`` [b, kv_heads, len, d] for the encoder's.
    """

    config: GemmaConfig
    stack: GemmaStack
    kind: str
    max_decode_length: int | None = None

    def _window(self, sliding: bool) -> tuple[int, int] | None:
        if not sliding:
            return None
        w = self.stack.sliding_window
        if self.kind == "encoder":
            # HF T5Gemma: |q - k| <= w; T5Gemma 2: (w + 1) // 2 back (self included) and w // 2 ahead
            return (w, w) if self.config.family == "t5gemma" else ((w + 1) // 2 - 1, w // 2)
        return (w - 1, 0)  # causal: k > q - w

    @nn.compact
    def __call__(
        self,
        x: Array,
        encoded: Array | None,
        rope: tuple[Array, Array] | None,
        self_pos: tuple[Array, Array, Array, Array],
        cross_pos: tuple[Array, Array, Array, Array] | None,
        sliding: Any,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        cfg, s = self.config, self.stack
        dtype, pdtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        hq, hkv, hd = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        dense = functools.partial(Dense, dtype=dtype, param_dtype=pdtype)
        qk_norm = cfg.family == "t5gemma2"
        norm = functools.partial(GemmaRMSNorm, s.rms_norm_eps, dtype, pdtype, "kv")
        q_norm = norm(name="q_norm") if qk_norm else (lambda t: t)
        k_norm = norm(name="k_norm") if qk_norm else (lambda t: t)
        k_proj = dense(hkv * hd, ("embed", "joined_kv"), name="k_proj")
        v_proj = dense(hkv * hd, ("embed", "joined_kv"), name="v_proj")

        def heads(t: Array, n: int) -> Array:
            return t.reshape(t.shape[:-1] + (n, hd))

        def cross_kv() -> tuple[Array, Array]:
            assert encoded is not None
            k = k_norm(heads(k_proj(encoded), hkv))
            return k, heads(v_proj(encoded), hkv)

        q = nn.with_logical_constraint(
            q_norm(heads(dense(hq * hd, ("embed", "joined_kv"), name="q_proj")(x), hq)), ("batch", "length", "heads", "kv")
        )
        if self.kind != "cross":
            assert rope is not None  # every kind but cross rotates q and k
            cos, sin = rope
            q = apply_rope(q, cos, sin)
        rng = self.make_rng("dropout") if (not deterministic and cfg.attention_dropout > 0) else None
        scale = s.query_pre_attn_scalar**-0.5
        softcap = s.attn_logit_softcapping if cfg.family == "t5gemma" else None  # HF's T5Gemma 2 never applies it
        attend = functools.partial(_attend, cfg, scale=scale, softcap=softcap)

        if self.kind in ("cross", "merged"):
            assert cross_pos is not None  # the decoder's kinds get the encoder's positions
            ck, cv = cached_cross_kv(self, decode, cross_kv)
            lse = self.kind == "merged"  # K/V once per input, also for a row per beam (model.per_input_cross)
            cross = per_input_cross(lambda q, k, v, p: attend(q, k, v, attn.Bias(), p, rng, return_lse=lse), q, ck, cv, cross_pos)
        if self.kind == "cross":
            out = cross
        else:
            k, v = k_norm(heads(k_proj(x), hkv)), heads(v_proj(x), hkv)
            k = apply_rope(k, cos, sin)
            if decode:
                k, v = cached_self_kv(self, k, v, q.shape[1], self.max_decode_length)
            causal = self.kind != "encoder"
            want_lse = self.kind == "merged"

            def run(window: tuple[int, int] | None) -> Any:
                def f(q: Array, k: Array, v: Array, r: Array | None) -> Any:
                    return attend(q, k, v, attn.Bias(causal=causal, window=window), self_pos, r, return_lse=want_lse)

                return f

            out = _cond(sliding, run(self._window(True)), run(None), q, k, v, rng)
            if want_lse:  # one softmax over the self and the encoder keys, each set with its own mask
                out, _ = attn.merge([out, cross])
        out = nn.with_logical_constraint(out.astype(dtype), ("batch", "length", "heads", "kv"))
        out = out.reshape(out.shape[:2] + (hq * hd,))
        return dense(s.hidden_size, ("joined_kv", "embed"), name="o_proj")(out)


class GemmaLayer(nn.Module):
    """One encoder or decoder layer with sandwich norms. ``sliding`` is the layer's type when known statically;
    None means it comes per call as a scanned flag (scan over layers of mixed types)."""

    config: GemmaConfig
    is_decoder: bool
    sliding: bool | None = None
    deterministic: bool = True
    decode: bool = False
    max_decode_length: int | None = None

    @nn.compact
    def __call__(self, x: Array, flag: Array, encoded: Array | None, ropes: tuple, self_pos: tuple, cross_pos: tuple | None):
        cfg, det = self.config, self.deterministic
        s = cfg.decoder if self.is_decoder else cfg.encoder
        sliding = self.sliding if self.sliding is not None else flag
        norm = functools.partial(GemmaRMSNorm, s.rms_norm_eps, _dtype(cfg.dtype), _dtype(cfg.param_dtype))
        drop = nn.Dropout(cfg.dropout_rate)
        rope = _pick(sliding, ropes[0], ropes[1])
        if not self.is_decoder:
            kind = "encoder"
        else:
            kind = "merged" if cfg.family == "t5gemma2" else "causal"
        h = norm(name="pre_self_attn_layernorm")(x)
        h = GemmaAttention(cfg, s, kind, self.max_decode_length, name="self_attn")(
            h, encoded, rope, self_pos, cross_pos, sliding, det, self.decode
        )
        h = norm(name="post_self_attn_layernorm")(h)
        x = _constrain(x + drop(h, deterministic=det))
        if kind == "causal":
            h = norm(name="pre_cross_attn_layernorm")(x)
            h = GemmaAttention(cfg, s, "cross", name="cross_attn")(h, encoded, None, self_pos, cross_pos, False, det, self.decode)
            h = norm(name="post_cross_attn_layernorm")(h)
            x = _constrain(x + drop(h, deterministic=det))
        h = norm(name="pre_feedforward_layernorm")(x)
        h = GemmaMLP(cfg, s, name="mlp")(h, det)
        h = norm(name="post_feedforward_layernorm")(h)
        x = _constrain(x + drop(h, deterministic=det))
        return x, None


def run_layers(cfg: GemmaConfig, is_decoder: bool, x: Array, args: tuple, **flags: Any) -> Array:
    """The stack's layers, as ``layers_<i>`` or (scan_layers) one scanned ``layers`` module whose per-layer
    type rides in as a scanned flag when the stack mixes sliding and global layers."""
    s = cfg.decoder if is_decoder else cfg.encoder
    layer_cls = _remat(GemmaLayer, cfg.remat_policy)
    types = s.sliding
    if cfg.scan_layers:
        uniform = types[0] if len(set(types)) == 1 else None
        scanned = nn.scan(
            layer_cls,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0,) + (nn.broadcast,) * len(args),
            length=s.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = scanned(cfg, is_decoder, uniform, **flags, name="layers")(x, jnp.asarray(types), *args)
        return x
    for i, t in enumerate(types):
        x, _ = layer_cls(cfg, is_decoder, t, **flags, name=f"layers_{i}")(x, None, *args)
    return x


def ropes(s: GemmaStack, positions: Array, dtype: Any) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """(sliding, global) cos/sin tables."""
    return (
        rope_tables(positions, s.head_dim, s.rope_local_base_freq, dtype),
        rope_tables(positions, s.head_dim, s.rope_theta, dtype, s.rope_scaling_factor),
    )
