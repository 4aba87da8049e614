"""The T5 encoder-decoder in flax.linen (T5 v1.0, v1.1 and Flan-T5).

The parameter tree is T5X's own (``token_embedder/embedding``, ``encoder/layers_0/attention/query/kernel``,
``decoder/logits_dense/kernel`` ...), with 2-D ``joined_kv`` attention kernels, so that T5X checkpoints load
as they are and Hugging Face checkpoints map onto it 1:1 (``dss_jax.convert``). Every parameter and the
major activations carry logical axis names; ``dss_jax.partitioning`` maps them onto a device mesh.

This module imports neither TensorFlow nor seqio.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, Union, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from dss_jax import attention as attn
from dss_jax.attention import relative_position_bucket  # noqa: F401  (re-exported: model.relative_position_bucket)

if TYPE_CHECKING:
    from dss_jax.gemma import GemmaConfig

Array = jax.Array

FEED_FORWARD_PROJS = ("relu", "gated-gelu")
REMAT_POLICIES = ("none", "full", "minimal")
NEG_INF = -1e10


ConfigT = TypeVar("ConfigT", bound="ConfigMethods")


class ConfigMethods:
    """What either family's config (T5Config, gemma.GemmaConfig) does alike: check its numerics, ``replace``,
    ``from_dict``. Errors name the config class and field."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # every subclass is a dataclass
    remat_policy: str
    attention_impl: str

    def _check_numerics(self) -> None:
        name = type(self).__name__
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"{name}.remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
        if self.attention_impl not in attn.IMPLS:
            raise ValueError(f"{name}.attention_impl={self.attention_impl!r}; expected one of {attn.IMPLS}")

    def replace(self: ConfigT, **changes: Any) -> ConfigT:
        return dataclasses.replace(self, **changes)

    def flop_shape(self) -> dict[str, Any]:
        """Matmul parameters a token passes through per stack (an encoder token also through the decoder's
        cross-attention keys and values), layer counts, attention widths (query heads x head dim) and per-layer
        sliding windows: the fields of ``flops.AttentionShape``."""
        raise NotImplementedError

    def train_flops_per_token(self, inputs_length: int, targets_length: int) -> float:
        """Approximate training FLOPs per target token (6 x matmul params, plus attention scores), for MFU reports."""
        s = self.flop_shape()
        ratio = inputs_length / max(targets_length, 1)
        matmul = (s["enc_params"] + s["cross_params"]) * ratio + s["dec_params"]
        scores = 2 * (
            s["enc_layers"] * s["enc_width"] * inputs_length * ratio
            + s["dec_layers"] * s["dec_width"] * (targets_length + inputs_length)
        )
        return 6.0 * matmul + 6.0 * scores

    @classmethod
    def from_dict(cls: type[ConfigT], d: dict[str, Any]) -> ConfigT:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(names)}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class T5Config(ConfigMethods):
    """Architecture and numerics of a T5 model; field names follow Hugging Face's ``T5Config``."""

    family: ClassVar[str] = "t5"  # the model family (see build); not stored: old dss_config.json files have none
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_heads: int = 6
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = False
    # attention (dss_jax.attention): "auto" picks per backend; blocks bound memory to O(length)
    attention_impl: str = "auto"
    attention_q_block: int = 512
    attention_k_block: int = 512
    attention_skip: str = "auto"  # which key blocks to skip (attention.attention's ``skip``; see partitioning.for_mesh)

    def __post_init__(self) -> None:
        if self.feed_forward_proj not in FEED_FORWARD_PROJS:
            raise ValueError(f"T5Config.feed_forward_proj={self.feed_forward_proj!r}; expected one of {FEED_FORWARD_PROJS}")
        if self.attention_skip not in attn.SKIPS:
            raise ValueError(f"T5Config.attention_skip={self.attention_skip!r}; expected one of {attn.SKIPS}")
        self._check_numerics()
        for name in (
            "vocab_size",
            "d_model",
            "d_kv",
            "d_ff",
            "num_heads",
            "num_encoder_layers",
            "num_decoder_layers",
            "attention_q_block",
            "attention_k_block",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    def flop_shape(self) -> dict[str, Any]:
        attn_params = 4 * self.d_model * self.num_heads * self.d_kv
        mlp = (3 if self.gated else 2) * self.d_model * self.d_ff
        kv_params = 2 * self.d_model * self.num_heads * self.d_kv  # cross-attention's K and V read encoder tokens
        return {
            "enc_params": self.num_encoder_layers * (attn_params + mlp),
            "cross_params": self.num_decoder_layers * kv_params,
            "dec_params": self.num_decoder_layers * (2 * attn_params - kv_params + mlp) + self.d_model * self.vocab_size,
            "enc_layers": self.num_encoder_layers,
            "dec_layers": self.num_decoder_layers,
            "enc_width": self.num_heads * self.d_kv,
            "dec_width": self.num_heads * self.d_kv,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def named_param(
    mdl: nn.Module, name: str, init: Callable[..., Array], axes: tuple[str, ...], shape: tuple[int, ...], dtype: Any
) -> Array:
    """A parameter whose axes carry logical names (``dss_jax.partitioning`` maps them onto the mesh). The model
    reads the plain array: flax unboxes it, though ``Module.param`` types it as the box."""
    return cast(Array, mdl.param(name, nn.with_logical_partitioning(init, axes), shape, dtype))


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, statistics in float32."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = named_param(self, "scale", nn.initializers.ones, ("embed",), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def token_matmul(x: Array, w: Array, spec: str) -> Array:
    """``x[..., d]`` times a 2-D weight over ``d`` (``spec``: ``"nd,df->nf"`` or ``"nd,vd->nv"``), with the leading
    axes folded into one token axis. The weight gradient then contracts one axis, which XLA:CPU's matmul reads in
    place; contracting (batch, length) makes it copy both operands to [features, tokens] first
    (docs/performance.md). A fold of leading axes is free on every backend."""
    y = jnp.einsum(spec, x.reshape(-1, x.shape[-1]), w)
    return y.reshape(x.shape[:-1] + y.shape[-1:])


class Dense(nn.Module):
    """A bias-free dense layer with a named, logically partitioned kernel."""

    features: int
    kernel_axes: tuple[str, str]
    init_scale: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")
        kernel = named_param(self, "kernel", init, self.kernel_axes, (x.shape[-1], self.features), self.param_dtype)
        return token_matmul(x.astype(self.dtype), kernel.astype(self.dtype), "nd,df->nf")


class RelativePositionBias(nn.Module):
    """The bucketed relative-position table [heads, buckets], one per stack, shared by all its layers (as in T5).

    Attention turns it into a bias block by block (``dss_jax.attention``), never at [batch, heads, q, k].
    """

    num_buckets: int
    num_heads: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> Array:
        init = nn.initializers.normal(1.0)
        return named_param(
            self, "rel_embedding", init, ("heads", "relpos_buckets"), (self.num_heads, self.num_buckets), self.param_dtype
        )


def cached_cross_kv(mdl: nn.Module, decode: bool, project: Callable[[], tuple[Array, Array]]) -> tuple[Array, Array]:
    """The encoder's keys and values from ``project``; when decoding, projected once, on the call that creates
    the cache, and read from it at every later step (no projection).

    Stored [batch, heads, length, kv], the layout the per-head dots read, so no step re-lays them out. The
    optimization barrier keeps XLA from cancelling the stored transpose against the read's and moving it into the
    decode loop, where it would copy every layer's keys and values at every step.
    """
    if decode and mdl.has_variable("cache", "cross_key"):
        return jnp.swapaxes(mdl.get_variable("cache", "cross_key"), 1, 2), jnp.swapaxes(
            mdl.get_variable("cache", "cross_value"), 1, 2
        )
    k, v = project()
    if decode:
        kt, vt = jax.lax.optimization_barrier((jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)))
        mdl.put_variable("cache", "cross_key", kt)
        mdl.put_variable("cache", "cross_value", vt)
    return k, v


def per_input_cross(
    fn: Callable[[Array, Array, Array, tuple[Array, Array, Array, Array]], Any],
    q: Array,
    k: Array,
    v: Array,
    pos: tuple[Array, Array, Array, Array],
) -> Any:
    """Cross-attention ``fn(q, k, v, pos)`` (returning out [b, q, h, d], or (out, lse)) when the cache holds the
    encoder's keys and values once per input and ``q`` has several rows per input (beam search's beams, each
    input's rows adjacent): each input's beams become its query positions, so its keys and values are read once,
    not once per beam. With as many query rows as key rows it is ``fn`` itself.
    """
    rows, inputs = q.shape[0], k.shape[0]
    if rows == inputs:
        return fn(q, k, v, pos)
    length = q.shape[1]
    q_pos, k_pos, q_seg, k_seg = pos

    def fold(x: Array) -> Array:
        x = jnp.broadcast_to(x, (rows, length) + x.shape[2:])
        return x.reshape((inputs, rows // inputs * length) + x.shape[2:])

    def unfold(x: Array) -> Array:
        return x.reshape((rows, length) + x.shape[2:])

    res = fn(fold(q), k, v, (fold(q_pos), k_pos, fold(q_seg), k_seg))
    return tuple(unfold(x) for x in res) if isinstance(res, tuple) else unfold(res)


def cached_self_kv(mdl: nn.Module, k: Array, v: Array, q_len: int, max_decode_length: int | None) -> tuple[Array, Array]:
    """Decoder self-attention's keys and values when decoding: the call that creates the cache
    (``max_decode_length`` slots) returns its own; each later step writes its one token's at the cache index
    and returns the whole cache.

    Slots are stored [batch, heads, length, kv], the layout the per-head dots read: stored [batch, length, ...],
    every step would re-lay out the whole cache of every layer before its dots.
    """
    is_initialized = mdl.has_variable("cache", "cached_key")
    shape = (k.shape[0], k.shape[2], max_decode_length or k.shape[1], k.shape[3])
    cached_key = mdl.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
    cached_value = mdl.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
    cache_index = mdl.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
    if is_initialized:
        if q_len != 1:
            raise ValueError(f"decode step expects one token per row, got length {q_len}")
        i = cache_index.value
        zero = jnp.array(0, dtype=jnp.int32)
        kc = jax.lax.dynamic_update_slice(cached_key.value, jnp.swapaxes(k, 1, 2), (zero, zero, i, zero))
        vc = jax.lax.dynamic_update_slice(cached_value.value, jnp.swapaxes(v, 1, 2), (zero, zero, i, zero))
        cached_key.value, cached_value.value = kc, vc
        cache_index.value = i + 1
        k, v = jnp.swapaxes(kc, 1, 2), jnp.swapaxes(vc, 1, 2)
    return k, v


def decoder_masks(
    mdl: nn.Module,
    encoded: Array,
    encoder_segment_ids: Array,
    decoder_input_tokens: Array,
    decoder_segment_ids: Array | None,
    decoder_positions: Array | None,
    decode: bool,
    max_decode_length: int | None,
) -> tuple[Array, tuple[Array, Array, Array, Array], tuple[Array, Array, Array, Array]]:
    """A decoder's query positions and its self- and cross-attention (q_pos, k_pos, q_seg, k_seg).

    A decode step after the cache's creation (its ``decode_marker``) has one token per row at
    ``decoder_positions`` and sees the whole cache of ``max_decode_length`` positions.
    """
    batch, length = decoder_input_tokens.shape
    if decode and mdl.has_variable("cache", "decode_marker"):
        assert max_decode_length is not None and decoder_positions is not None
        q_pos, dec_seg = decoder_positions, jnp.ones((batch, 1), jnp.int32)
        k_pos = jnp.arange(max_decode_length, dtype=jnp.int32)[None]
        self_pos = (q_pos, k_pos, dec_seg, jnp.ones((batch, max_decode_length), jnp.int32))
    else:
        if decode:
            mdl.variable("cache", "decode_marker", lambda: jnp.zeros((), jnp.int32))
        q_pos = jnp.arange(length, dtype=jnp.int32)[None]
        dec_seg = decoder_segment_ids if decoder_segment_ids is not None else jnp.ones((batch, length), jnp.int32)
        self_pos = (q_pos, q_pos, dec_seg, dec_seg)
    enc_pos = jnp.zeros((1, encoded.shape[1]), jnp.int32)  # cross-attention has no position bias
    return q_pos, self_pos, (q_pos, enc_pos, dec_seg, encoder_segment_ids)


class Attention(nn.Module):
    """Multi-head dot-product attention without 1/sqrt(d) scaling (T5 folds it into the query init).

    ``bias`` says whether the relative-position table applies and whether it is causal; masks come from
    segment ids and positions (``dss_jax.attention``). With ``decode=True`` self-attention keeps earlier
    steps' keys and values in the ``cache`` collection (``max_decode_length`` slots); cross-attention
    (``cross=True``) computes the encoder's keys and values once, on the call that creates the cache, and
    reads them from the cache at every later step, where the cache may hold them once per input for several
    query rows per input (``per_input_cross``).
    """

    config: T5Config
    bias: attn.Bias
    cross: bool = False
    max_decode_length: int | None = None

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array,
        table: Array | None,
        pos: tuple[Array, Array, Array, Array],
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        cfg = self.config
        dtype, pdtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        inner = cfg.num_heads * cfg.d_kv
        dense = functools.partial(Dense, dtype=dtype, param_dtype=pdtype)

        def split(x: Array) -> Array:
            x = x.reshape(x.shape[:-1] + (cfg.num_heads, cfg.d_kv))
            return nn.with_logical_constraint(x, ("batch", "length", "heads", "kv"))

        def project_kv() -> tuple[Array, Array]:
            k = dense(inner, ("embed", "joined_kv"), name="key")(inputs_kv)
            v = dense(inner, ("embed", "joined_kv"), name="value")(inputs_kv)
            return split(k), split(v)

        q = split(dense(inner, ("embed", "joined_kv"), init_scale=1.0 / cfg.d_kv, name="query")(inputs_q))
        if self.cross:
            k, v = cached_cross_kv(self, decode, project_kv)
        else:
            k, v = project_kv()
            if decode:
                k, v = cached_self_kv(self, k, v, q.shape[1], self.max_decode_length)

        rng = self.make_rng("dropout") if (not deterministic and cfg.dropout_rate > 0) else None
        impl = attn.resolve_impl(cfg.attention_impl, cfg.dtype)

        def run(q: Array, k: Array, v: Array, pos: tuple[Array, Array, Array, Array]) -> Array:
            if impl == "cudnn" and rng is None:
                return attn.cudnn_attention(q, k, v, table, self.bias, *pos)
            return attn.attention(  # type: ignore[return-value]  # Array: no return_lse
                q,
                k,
                v,
                table,
                self.bias,
                *pos,
                q_block=cfg.attention_q_block,
                k_block=cfg.attention_k_block,
                dropout_rng=rng,
                dropout_rate=cfg.dropout_rate,
                skip=cfg.attention_skip,
            )

        out = per_input_cross(run, q, k, v, pos) if self.cross else run(q, k, v, pos)
        out = nn.with_logical_constraint(out.astype(dtype), ("batch", "length", "heads", "kv"))
        out = out.reshape(out.shape[:2] + (inner,))
        return dense(cfg.d_model, ("joined_kv", "embed"), name="out")(out)


class MLP(nn.Module):
    """T5's feed-forward block: ReLU (v1.0) or gated GELU (v1.1, Flan-T5)."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        dense = functools.partial(Dense, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype))
        if cfg.gated:
            h = jax.nn.gelu(dense(cfg.d_ff, ("embed", "mlp"), name="wi_0")(x), approximate=True)
            h = h * dense(cfg.d_ff, ("embed", "mlp"), name="wi_1")(x)
        else:
            h = jax.nn.relu(dense(cfg.d_ff, ("embed", "mlp"), name="wi")(x))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        return dense(cfg.d_model, ("mlp", "embed"), name="wo")(h)


def _constrain(x: Array) -> Array:
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def _bias(cfg: T5Config, bidirectional: bool, causal: bool = False) -> attn.Bias:
    return attn.Bias(bidirectional, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance, causal)


class EncoderLayer(nn.Module):
    config: T5Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, table: Array, pos: Array, seg: Array) -> tuple[Array, None]:
        cfg, deterministic = self.config, self.deterministic
        norm = functools.partial(RMSNorm, cfg.layer_norm_epsilon, _dtype(cfg.dtype), _dtype(cfg.param_dtype))
        drop = nn.Dropout(cfg.dropout_rate)
        h = norm(name="pre_attention_layer_norm")(x)
        h = Attention(cfg, _bias(cfg, True), name="attention")(h, h, table, (pos, pos, seg, seg), deterministic)
        x = _constrain(x + drop(h, deterministic=deterministic))
        h = norm(name="pre_mlp_layer_norm")(x)
        h = MLP(cfg, name="mlp")(h, deterministic)
        x = _constrain(x + drop(h, deterministic=deterministic))
        return x, None


class DecoderLayer(nn.Module):
    config: T5Config
    deterministic: bool = True
    decode: bool = False
    max_decode_length: int | None = None

    @nn.compact
    def __call__(self, x: Array, encoded: Array, table: Array, self_pos: tuple, cross_pos: tuple) -> tuple[Array, None]:
        cfg, deterministic, decode = self.config, self.deterministic, self.decode
        norm = functools.partial(RMSNorm, cfg.layer_norm_epsilon, _dtype(cfg.dtype), _dtype(cfg.param_dtype))
        drop = nn.Dropout(cfg.dropout_rate)
        h = norm(name="pre_self_attention_layer_norm")(x)
        self_attn = Attention(
            cfg, _bias(cfg, False, causal=True), max_decode_length=self.max_decode_length, name="self_attention"
        )
        h = self_attn(h, h, table, self_pos, deterministic, decode)
        x = _constrain(x + drop(h, deterministic=deterministic))
        h = norm(name="pre_cross_attention_layer_norm")(x)
        h = Attention(cfg, _bias(cfg, True), cross=True, name="encoder_decoder_attention")(
            h, encoded, None, cross_pos, deterministic, decode
        )
        x = _constrain(x + drop(h, deterministic=deterministic))
        h = norm(name="pre_mlp_layer_norm")(x)
        h = MLP(cfg, name="mlp")(h, deterministic)
        x = _constrain(x + drop(h, deterministic=deterministic))
        return x, None


def _remat(layer_cls: type[nn.Module], policy: str) -> type[nn.Module]:
    if policy == "none":
        return layer_cls
    jax_policy = None if policy == "full" else jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
    return nn.remat(layer_cls, policy=jax_policy, prevent_cse=True)


def _stack(layer_cls: type[nn.Module], cfg: T5Config, num_layers: int, carry: Array, args: tuple, **flags: Any) -> Array:
    """Runs ``num_layers`` layers, as ``layers_<i>`` modules or (scan_layers) one scanned ``layers`` module.

    ``flags`` (deterministic, decode) are module attributes, so remat and scan see only arrays.
    """
    layer_cls = _remat(layer_cls, cfg.remat_policy)
    if cfg.scan_layers:
        scanned = nn.scan(
            layer_cls,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(args),
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        carry, _ = scanned(cfg, **flags, name="layers")(carry, *args)
        return carry
    for i in range(num_layers):
        carry, _ = layer_cls(cfg, **flags, name=f"layers_{i}")(carry, *args)
    return carry


def _segments(tokens: Array, segment_ids: Array | None) -> Array:
    return (tokens != 0).astype(jnp.int32) if segment_ids is None else segment_ids


class Encoder(nn.Module):
    config: T5Config
    embedder: nn.Module

    @nn.compact
    def __call__(self, tokens: Array, segment_ids: Array | None = None, deterministic: bool = True) -> Array:
        cfg = self.config
        seg = _segments(tokens, segment_ids)
        pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        table = RelativePositionBias(
            cfg.relative_attention_num_buckets, cfg.num_heads, _dtype(cfg.param_dtype), name="relpos_bias"
        )()
        x = self.embedder(tokens).astype(_dtype(cfg.dtype))
        x = _constrain(nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic))
        x = _stack(EncoderLayer, cfg, cfg.num_encoder_layers, x, (table, pos, seg), deterministic=deterministic)
        x = RMSNorm(cfg.layer_norm_epsilon, _dtype(cfg.dtype), _dtype(cfg.param_dtype), name="encoder_norm")(x)
        return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
    config: T5Config
    embedder: nn.Module

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
        """Returns logits [batch, length, vocab] in float32.

        In decode mode ``decoder_input_tokens`` is one token per row and ``decoder_positions`` [batch, 1]
        its position; keys cover the whole cache of ``max_decode_length`` positions.
        """
        cfg = self.config
        table = RelativePositionBias(
            cfg.relative_attention_num_buckets, cfg.num_heads, _dtype(cfg.param_dtype), name="relpos_bias"
        )()
        _, self_pos, cross_pos = decoder_masks(
            self,
            encoded,
            encoder_segment_ids,
            decoder_input_tokens,
            decoder_segment_ids,
            decoder_positions,
            decode,
            max_decode_length,
        )

        x = self.embedder(decoder_input_tokens).astype(_dtype(cfg.dtype))
        x = _constrain(nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic))
        x = _stack(
            DecoderLayer,
            cfg,
            cfg.num_decoder_layers,
            x,
            (encoded, table, self_pos, cross_pos),
            deterministic=deterministic,
            decode=decode,
            max_decode_length=max_decode_length if decode else None,
        )
        x = RMSNorm(cfg.layer_norm_epsilon, _dtype(cfg.dtype), _dtype(cfg.param_dtype), name="decoder_norm")(x)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        if cfg.tie_word_embeddings:
            logits = self.embedder.attend(x * (cfg.d_model**-0.5))
        else:
            logits = Dense(
                cfg.vocab_size,
                ("embed", "vocab"),
                dtype=_dtype(cfg.dtype),
                param_dtype=_dtype(cfg.param_dtype),
                name="logits_dense",
            )(x)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32)


class Embed(nn.Module):
    """Token embedding shared by encoder, decoder and (v1.0) the output head."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        init = nn.initializers.normal(1.0)
        self.embedding = named_param(
            self, "embedding", init, ("vocab", "embed"), (self.num_embeddings, self.features), self.param_dtype
        )

    def __call__(self, tokens: Array) -> Array:
        return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        return token_matmul(x.astype(self.dtype), self.embedding.astype(self.dtype), "nd,vd->nv")


class EncoderDecoder(nn.Module):
    """``encode``, ``decode`` and the teacher-forced ``__call__`` over the encoder and decoder that a subclass's
    ``stacks`` makes (T5 here, ``gemma.T5Gemma``)."""

    def stacks(self) -> tuple[nn.Module, nn.Module]:
        """(encoder, decoder), made once in ``setup``."""
        raise NotImplementedError

    def setup(self) -> None:
        self.encoder, self.decoder = self.stacks()

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
        """Logits [batch, length, vocab] in float32; see ``Decoder.__call__``."""
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


class T5(EncoderDecoder):
    """T5 encoder-decoder. ``__call__`` is teacher-forced; ``encode``/``decode`` serve autoregressive decoding."""

    config: T5Config

    def stacks(self) -> tuple[nn.Module, nn.Module]:
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, _dtype(cfg.dtype), _dtype(cfg.param_dtype))
        return Encoder(cfg, self.token_embedder), Decoder(cfg, self.token_embedder)


# Either family's config: everything outside model.py / gemma.py / convert.py takes this and calls build().
ModelConfig = Union[T5Config, "GemmaConfig"]


def build(cfg: ModelConfig) -> nn.Module:
    """The model of a config's family: ``T5`` for T5Config, ``gemma.T5Gemma`` for GemmaConfig."""
    if isinstance(cfg, T5Config):
        return T5(cfg)
    from dss_jax import gemma

    return gemma.T5Gemma(cfg)


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """A config from its ``to_dict()`` (e.g. dss_config.json); ``family`` picks the class, absent means T5."""
    family = d.get("family", "t5")
    if family == "t5":
        return T5Config.from_dict({k: v for k, v in d.items() if k != "family"})
    from dss_jax import gemma

    if family not in gemma.FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {('t5',) + gemma.FAMILIES}")
    return gemma.GemmaConfig.from_dict(d)


def shift_right(targets: np.ndarray | Array, start_id: int = 0) -> Array:
    """Decoder inputs from targets: start token, then targets without their last token."""
    targets = jnp.asarray(targets)
    return jnp.concatenate([jnp.full_like(targets[:, :1], start_id), targets[:, :-1]], axis=1)


@functools.partial(jax.jit, static_argnames=("config", "batch", "enc_len", "dec_len"))
def _init_variables(config: ModelConfig, rng: Array, batch: int, enc_len: int, dec_len: int) -> Any:
    """One compile per config and shape; eager flax would dispatch (and compile) the forward op by op."""
    return build(config).init(rng, jnp.ones((batch, enc_len), jnp.int32), jnp.ones((batch, dec_len), jnp.int32))


def init_params(config: ModelConfig, rng: Array, batch: int = 1, enc_len: int = 8, dec_len: int = 8) -> dict:
    """Initialises unboxed parameters (for tests and from-scratch training without a mesh)."""
    variables = _init_variables(config, rng, batch=batch, enc_len=enc_len, dec_len=dec_len)
    return nn.meta.unbox(variables["params"])


def count_params(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
