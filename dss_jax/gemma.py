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

The layers are in ``dss_jax.gemma_layers``; this module holds the configs and the encoder-decoder.
Text only: T5Gemma 2's vision tower is not part of this model (``dss_jax.convert_gemma`` drops it on import).
This module imports neither TensorFlow nor seqio.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from dss_jax import attention as attn
from dss_jax.gemma_layers import GemmaEmbed, GemmaRMSNorm, ropes, run_layers
from dss_jax.model import ConfigMethods, Dense, EncoderDecoder, _constrain, _dtype, _segments, decoder_masks

Array = jax.Array

FAMILIES = ("t5gemma", "t5gemma2")
LAYER_TYPES = ("sliding_attention", "full_attention")


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
class GemmaConfig(ConfigMethods):
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
    attention_skip: str = "auto"  # which key blocks to skip (attention.attention's ``skip``; see partitioning.for_mesh)

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder", _stack(self.encoder))
        object.__setattr__(self, "decoder", _stack(self.decoder))
        if self.family not in FAMILIES:
            raise ValueError(f"GemmaConfig.family={self.family!r}; expected one of {FAMILIES}")
        if self.attention_skip not in attn.SKIPS:
            raise ValueError(f"GemmaConfig.attention_skip={self.attention_skip!r}; expected one of {attn.SKIPS}")
        self._check_numerics()
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

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for s in ("encoder", "decoder"):
            d[s]["layer_types"] = list(d[s]["layer_types"])
        return d

    def flop_shape(self) -> dict[str, Any]:
        def attn_params(s: GemmaStack, kv_in: int) -> int:
            return 2 * s.hidden_size * s.num_attention_heads * s.head_dim + 2 * kv_in * s.num_key_value_heads * s.head_dim

        def windows(s: GemmaStack) -> tuple[int | None, ...]:
            return tuple(s.sliding_window if t == "sliding_attention" else None for t in s.layer_types)

        e, d = self.encoder, self.decoder
        # cross-attention's K and V read the encoder's output: per encoder token. T5Gemma's cross-attention also has
        # its own query and output (per decoder token); T5Gemma 2's merged attention adds only the K and V.
        cross_kv = 2 * e.hidden_size * d.num_key_value_heads * d.head_dim
        cross_q_o = 2 * d.hidden_size * d.num_attention_heads * d.head_dim if self.family == "t5gemma" else 0
        return {
            "enc_params": e.num_hidden_layers * (attn_params(e, e.hidden_size) + 3 * e.hidden_size * e.intermediate_size),
            "cross_params": d.num_hidden_layers * cross_kv,
            "dec_params": d.num_hidden_layers
            * (attn_params(d, d.hidden_size) + cross_q_o + 3 * d.hidden_size * d.intermediate_size)
            + d.hidden_size * self.vocab_size,
            "enc_layers": e.num_hidden_layers,
            "dec_layers": d.num_hidden_layers,
            "enc_width": e.num_attention_heads * e.head_dim,
            "dec_width": d.num_attention_heads * d.head_dim,
            "enc_windows": windows(e),
            "dec_windows": windows(d),
        }


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
        x = run_layers(cfg, False, x, (None, ropes(s, pos, dtype), (pos, pos, seg, seg), None), deterministic=deterministic)
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
        q_pos, self_pos, cross_pos = decoder_masks(
            self,
            encoded,
            encoder_segment_ids,
            decoder_input_tokens,
            decoder_segment_ids,
            decoder_positions,
            decode,
            max_decode_length,
        )

        x = _constrain(nn.Dropout(cfg.dropout_rate)(embed(decoder_input_tokens), deterministic=deterministic))
        x = run_layers(
            cfg,
            True,
            x,
            (encoded, ropes(s, q_pos, dtype), self_pos, cross_pos),
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


class T5Gemma(EncoderDecoder):
    """T5Gemma / T5Gemma 2 with ``dss_jax.model.T5``'s methods: teacher-forced ``__call__``, ``encode``, ``decode``."""

    config: GemmaConfig

    def stacks(self) -> tuple[nn.Module, nn.Module]:
        cfg = self.config
        shared = None
        if cfg.shared_embedding:
            shared = GemmaEmbed(
                cfg.vocab_size, cfg.d_model, cfg.eoi_token_index, _dtype(cfg.dtype), _dtype(cfg.param_dtype), name="embed_tokens"
            )
        return GemmaEncoder(cfg, shared), GemmaDecoder(cfg, shared)
