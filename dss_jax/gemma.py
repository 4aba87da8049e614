"""T5Gemma and T5Gemma 2 encoder-decoders in flax.linen, with T5's interface (``dss_jax.model.T5``).

T5Gemma (Gemma 2 blocks) and T5Gemma 2 (Gemma 3 blocks) share: RMSNorm with ``(1 + w)`` and sandwich norms around
every sub-block, GeGLU with tanh gelu, rotary position embeddings, grouped-query attention scaled by
``query_pre_attn_scalar ** -0.5``, sliding-window layers interleaved with global ones per ``layer_types``, and
embeddings scaled by ``sqrt(hidden_size)``. T5Gemma adds attention-logit and final-logit softcapping and a
separate cross-attention per decoder layer; T5Gemma 2 adds QK-norm, separate RoPE bases for local and global
layers, one embedding shared by encoder, decoder and output head, and a *merged* decoder attention (one softmax
over the causal self keys and the encoder keys, here two attentions combined by their log-sum-exps).

The parameter tree mirrors Hugging Face's module names (``encoder/layers_0/self_attn/q_proj/kernel`` <->
``model.encoder.layers.0.self_attn.q_proj.weight``), so ``dss_jax.convert`` maps it 1:1; kernels are 2-D with
T5's logical axis names (embed, joined_kv, mlp, vocab), so ``dss_jax.partitioning`` shards them unchanged.
Sliding and global layers differ only in their attention window and RoPE base, so with ``scan_layers`` one
scanned layer takes its type as a per-layer flag (``jax.lax.cond`` picks the window) and the tree stays
``layers_<i>`` when unscanned.

Text only: T5Gemma 2's vision tower is not part of this model (``dss_jax.convert`` drops it on import).
This module imports neither TensorFlow nor seqio.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from dss_jax import attention as attn
from dss_jax.model import Dense, _remat

Array = jax.Array

FAMILIES = ("t5gemma", "t5gemma2")
LAYER_TYPES = ("sliding_attention", "full_attention")
REMAT_POLICIES = ("none", "full", "minimal")


@dataclasses.dataclass(frozen=True)
class GemmaStack:
    """One stack (encoder or decoder); field names follow Hugging Face's T5Gemma(2) text sub-configs."""

    hidden_size: int = 640
    intermediate_size: int = 2048
    num_hidden_layers: int = 18
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 256
    layer_types: tuple[str, ...] = ()
    sliding_window: int = 512
    query_pre_attn_scalar: float = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # global (full_attention) layers; T5Gemma's only base
    rope_local_base_freq: float = 10_000.0  # sliding layers (T5Gemma 2); T5Gemma uses rope_theta for both
    rope_scaling_factor: float = 1.0  # HF rope_type "linear" on global layers (frequencies divided by it)
    attn_logit_softcapping: float | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_hidden_layers)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"GemmaStack.layer_types has {len(self.layer_types)} entries for num_hidden_layers={self.num_hidden_layers}"
            )
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"GemmaStack.layer_types: unknown {bad}; expected {LAYER_TYPES}")
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GemmaStack.{name} must be positive, got {getattr(self, name)}")
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"GemmaStack.num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"GemmaStack.head_dim={self.head_dim} must be even (rotary embeddings)")

    @property
    def sliding(self) -> tuple[bool, ...]:
        return tuple(t == "sliding_attention" for t in self.layer_types)


def _stack(d: GemmaStack | dict[str, Any] | None) -> GemmaStack:
    if isinstance(d, GemmaStack):
        return d
    d = dict(d or {})
    names = {f.name for f in dataclasses.fields(GemmaStack)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown GemmaStack fields {unknown}; known fields: {sorted(names)}")
    return GemmaStack(**d)


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Architecture and numerics of a T5Gemma (``family="t5gemma"``) or T5Gemma 2 (``"t5gemma2"``) model.

    ``encoder``/``decoder`` hold each stack's dims (T5Gemma's stacks may differ, e.g. 9B-2B); the rest is
    shared. The numerics fields are T5Config's, with the same meaning.
    """

    family: str = "t5gemma2"
    encoder: GemmaStack = GemmaStack()
    decoder: GemmaStack = GemmaStack()
    vocab_size: int = 262_144
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    eoi_token_index: int = 256_000  # T5Gemma 2: this id reads a learned ``eoi_embedding`` instead of its row
    dropout_rate: float = 0.0
    attention_dropout: float = 0.0
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = False
    attention_impl: str = "auto"
    attention_q_block: int = 512
    attention_k_block: int = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder", _stack(self.encoder))
        object.__setattr__(self, "decoder", _stack(self.decoder))
        if self.family not in FAMILIES:
            raise ValueError(f"GemmaConfig.family={self.family!r}; expected one of {FAMILIES}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"GemmaConfig.remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
        if self.attention_impl not in attn.IMPLS:
            raise ValueError(f"GemmaConfig.attention_impl={self.attention_impl!r}; expected one of {attn.IMPLS}")
        if self.family == "t5gemma2" and self.encoder.hidden_size != self.decoder.hidden_size:
            raise ValueError("GemmaConfig: T5Gemma 2 needs encoder.hidden_size == decoder.hidden_size (one shared embedding)")
        for name in ("vocab_size", "attention_q_block", "attention_k_block"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GemmaConfig.{name} must be positive, got {getattr(self, name)}")

    # what the rest of dss_jax reads from either family's config
    @property
    def decoder_start_token_id(self) -> int:
        """Hugging Face starts T5Gemma(2) decoder sequences with bos."""
        return self.bos_token_id

    @property
    def d_model(self) -> int:
        return self.decoder.hidden_size

    @property
    def num_encoder_layers(self) -> int:
        return self.encoder.num_hidden_layers

    @property
    def num_decoder_layers(self) -> int:
        return self.decoder.num_hidden_layers

    @property
    def shared_embedding(self) -> bool:
        """T5Gemma 2: one embedding for encoder, decoder (and the tied head); T5Gemma: one per stack."""
        return self.family == "t5gemma2"

    def replace(self, **changes: Any) -> GemmaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for s in ("encoder", "decoder"):
            d[s]["layer_types"] = list(d[s]["layer_types"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GemmaConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown GemmaConfig fields {unknown}; known fields: {sorted(names)}")
        return cls(**d)

    def train_flops_per_token(self, inputs_length: int, targets_length: int) -> float:
        """Approximate training FLOPs per target token (6 x matmul params, plus attention scores)."""

        def attn_params(s: GemmaStack, kv_in: int) -> int:
            return s.hidden_size * s.num_attention_heads * s.head_dim * 2 + 2 * kv_in * s.num_key_value_heads * s.head_dim

        e, dcd = self.encoder, self.decoder
        mlp_e, mlp_d = 3 * e.hidden_size * e.intermediate_size, 3 * dcd.hidden_size * dcd.intermediate_size
        enc = e.num_hidden_layers * (attn_params(e, e.hidden_size) + mlp_e)
        cross = (
            attn_params(dcd, e.hidden_size)
            if self.family == "t5gemma"
            else 2 * e.hidden_size * dcd.num_key_value_heads * dcd.head_dim
        )
        dec = dcd.num_hidden_layers * (attn_params(dcd, dcd.hidden_size) + cross + mlp_d) + dcd.hidden_size * self.vocab_size
        ratio = inputs_length / max(targets_length, 1)
        scores = 2 * (
            e.num_hidden_layers * e.num_attention_heads * e.head_dim * inputs_length * ratio
            + dcd.num_hidden_layers * dcd.num_attention_heads * dcd.head_dim * (targets_length + inputs_length)
        )
        return 6.0 * (enc * ratio + dec) + 6.0 * scores


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


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
        **kw,
    )


# ----------------------------------------------------------------------------- blocks


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + w)`` in float32, ``w`` initialised to 0."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)), (x.shape[-1],), self.param_dtype
        )
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
        self.embedding = self.param(
            "embedding",
            # std 1/sqrt(d): the sqrt(d)-scaled embedding has unit entries, and the tied head's logits unit std
            nn.with_logical_partitioning(nn.initializers.normal(self.features**-0.5), ("vocab", "embed")),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )
        if self.eoi_token_index is not None:
            self.eoi_embedding = self.param(
                "eoi_embedding",
                nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                (self.features,),
                self.param_dtype,
            )

    def __call__(self, tokens: Array) -> Array:
        x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
        x = x * jnp.asarray(self.features**0.5, self.dtype)
        if self.eoi_token_index is not None:
            x = jnp.where((tokens == self.eoi_token_index)[..., None], self.eoi_embedding.astype(self.dtype), x)
        return x

    def attend(self, x: Array) -> Array:
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))


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
            cos, sin = rope
            q = apply_rope(q, cos, sin)
        rng = self.make_rng("dropout") if (not deterministic and cfg.attention_dropout > 0) else None
        scale = s.query_pre_attn_scalar**-0.5
        softcap = s.attn_logit_softcapping if cfg.family == "t5gemma" else None  # HF's T5Gemma 2 never applies it
        attend = functools.partial(_attend, cfg, scale=scale, softcap=softcap)

        if self.kind in ("cross", "merged"):
            if decode and self.has_variable("cache", "cross_key"):
                ck = jnp.swapaxes(self.get_variable("cache", "cross_key"), 1, 2)
                cv = jnp.swapaxes(self.get_variable("cache", "cross_value"), 1, 2)
            else:
                ck, cv = cross_kv()
                if decode:
                    self.put_variable("cache", "cross_key", jnp.swapaxes(ck, 1, 2))
                    self.put_variable("cache", "cross_value", jnp.swapaxes(cv, 1, 2))
        if self.kind == "cross":
            out = attend(q, ck, cv, attn.Bias(), cross_pos, rng, return_lse=False)
        else:
            k, v = k_norm(heads(k_proj(x), hkv)), heads(v_proj(x), hkv)
            k = apply_rope(k, cos, sin)
            if decode:
                is_initialized = self.has_variable("cache", "cached_key")
                shape = (k.shape[0], self.max_decode_length or k.shape[1]) + k.shape[2:]
                cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
                cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
                cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
                if is_initialized:
                    if q.shape[1] != 1:
                        raise ValueError(f"decode step expects one token per row, got length {q.shape[1]}")
                    i, zero = cache_index.value, jnp.array(0, dtype=jnp.int32)
                    k = jax.lax.dynamic_update_slice(cached_key.value, k, (zero, i, zero, zero))
                    v = jax.lax.dynamic_update_slice(cached_value.value, v, (zero, i, zero, zero))
                    cached_key.value, cached_value.value = k, v
                    cache_index.value = i + 1
            causal = self.kind != "encoder"
            want_lse = self.kind == "merged"

            def run(window: tuple[int, int] | None) -> Any:
                def f(q: Array, k: Array, v: Array, r: Array | None) -> Any:
                    return attend(q, k, v, attn.Bias(causal=causal, window=window), self_pos, r, return_lse=want_lse)

                return f

            out = _cond(sliding, run(self._window(True)), run(None), q, k, v, rng)
            if want_lse:  # one softmax over the self and the encoder keys, each set with its own mask
                out, _ = attn.merge([out, attend(q, ck, cv, attn.Bias(), cross_pos, rng, return_lse=True)])
        out = nn.with_logical_constraint(out.astype(dtype), ("batch", "length", "heads", "kv"))
        out = out.reshape(out.shape[:2] + (hq * hd,))
        return dense(s.hidden_size, ("joined_kv", "embed"), name="o_proj")(out)


def _constrain(x: Array) -> Array:
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


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


def _run_layers(cfg: GemmaConfig, is_decoder: bool, x: Array, args: tuple, **flags: Any) -> Array:
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


def _ropes(s: GemmaStack, positions: Array, dtype: Any) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """(sliding, global) cos/sin tables."""
    return (
        rope_tables(positions, s.head_dim, s.rope_local_base_freq, dtype),
        rope_tables(positions, s.head_dim, s.rope_theta, dtype, s.rope_scaling_factor),
    )


def _segments(tokens: Array, segment_ids: Array | None) -> Array:
    return (tokens != 0).astype(jnp.int32) if segment_ids is None else segment_ids


class GemmaEncoder(nn.Module):
    config: GemmaConfig
    embedder: nn.Module | None = None

    @nn.compact
    def __call__(self, tokens: Array, segment_ids: Array | None = None, deterministic: bool = True) -> Array:
        cfg = self.config
        s, dtype = cfg.encoder, _dtype(cfg.dtype)
        embed = self.embedder or GemmaEmbed(
            cfg.vocab_size, s.hidden_size, None, dtype, _dtype(cfg.param_dtype), name="embed_tokens"
        )
        seg = _segments(tokens, segment_ids)
        pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        x = _constrain(nn.Dropout(cfg.dropout_rate)(embed(tokens), deterministic=deterministic))
        x = _run_layers(cfg, False, x, (None, _ropes(s, pos, dtype), (pos, pos, seg, seg), None), deterministic=deterministic)
        x = GemmaRMSNorm(s.rms_norm_eps, dtype, _dtype(cfg.param_dtype), name="norm")(x)
        return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class GemmaDecoder(nn.Module):
    config: GemmaConfig
    embedder: nn.Module | None = None

    @nn.compact
    def __call__(
        self,
        encoded: Array,
        encoder_segment_ids: Array,
        decoder_input_tokens: Array,
        decoder_segment_ids: Array | None = None,
        decoder_positions: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        max_decode_length: int | None = None,
    ) -> Array:
        """Returns logits [batch, length, vocab] in float32 (decode mode: one token per row, see model.Decoder)."""
        cfg = self.config
        s, dtype, pdtype = cfg.decoder, _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        embed = self.embedder or GemmaEmbed(cfg.vocab_size, s.hidden_size, None, dtype, pdtype, name="embed_tokens")
        batch, length = decoder_input_tokens.shape
        if decode and self.has_variable("cache", "decode_marker"):
            assert max_decode_length is not None and decoder_positions is not None
            q_pos, dec_seg = decoder_positions, jnp.ones((batch, 1), jnp.int32)
            k_pos = jnp.arange(max_decode_length, dtype=jnp.int32)[None]
            self_pos = (q_pos, k_pos, dec_seg, jnp.ones((batch, max_decode_length), jnp.int32))
        else:
            if decode:
                self.variable("cache", "decode_marker", lambda: jnp.zeros((), jnp.int32))
            q_pos = jnp.arange(length, dtype=jnp.int32)[None]
            dec_seg = decoder_segment_ids if decoder_segment_ids is not None else jnp.ones((batch, length), jnp.int32)
            self_pos = (q_pos, q_pos, dec_seg, dec_seg)
        cross_pos = (q_pos, jnp.zeros((1, encoded.shape[1]), jnp.int32), dec_seg, encoder_segment_ids)

        x = _constrain(nn.Dropout(cfg.dropout_rate)(embed(decoder_input_tokens), deterministic=deterministic))
        x = _run_layers(
            cfg,
            True,
            x,
            (encoded, _ropes(s, q_pos, dtype), self_pos, cross_pos),
            deterministic=deterministic,
            decode=decode,
            max_decode_length=max_decode_length if decode else None,
        )
        x = GemmaRMSNorm(s.rms_norm_eps, dtype, pdtype, name="norm")(x)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = Dense(cfg.vocab_size, ("embed", "vocab"), dtype=dtype, param_dtype=pdtype, name="lm_head")(x)
        logits = logits.astype(jnp.float32)
        if cfg.final_logit_softcapping:
            c = cfg.final_logit_softcapping
            logits = c * jnp.tanh(logits / c)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class T5Gemma(nn.Module):
    """T5Gemma / T5Gemma 2 with ``dss_jax.model.T5``'s methods: teacher-forced ``__call__``, ``encode``, ``decode``."""

    config: GemmaConfig

    def setup(self) -> None:
        cfg = self.config
        shared = None
        if cfg.shared_embedding:
            shared = GemmaEmbed(
                cfg.vocab_size, cfg.d_model, cfg.eoi_token_index, _dtype(cfg.dtype), _dtype(cfg.param_dtype), name="embed_tokens"
            )
        self.encoder = GemmaEncoder(cfg, shared)
        self.decoder = GemmaDecoder(cfg, shared)

    def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None, deterministic: bool = True) -> Array:
        return self.encoder(encoder_input_tokens, encoder_segment_ids, deterministic)

    def decode(
        self,
        encoded: Array,
        encoder_segment_ids: Array,
        decoder_input_tokens: Array,
        decoder_segment_ids: Array | None = None,
        decoder_positions: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        max_decode_length: int | None = None,
    ) -> Array:
        return self.decoder(
            encoded,
            encoder_segment_ids,
            decoder_input_tokens,
            decoder_segment_ids,
            decoder_positions,
            deterministic,
            decode,
            max_decode_length,
        )

    def __call__(
        self,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """Teacher-forced logits [batch, target_length, vocab] (float32)."""
        enc_seg = _segments(encoder_input_tokens, encoder_segment_ids)
        encoded = self.encode(encoder_input_tokens, enc_seg, deterministic)
        return self.decode(encoded, enc_seg, decoder_input_tokens, decoder_segment_ids, None, deterministic)
