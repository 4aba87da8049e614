"""Tiny model configs for tests, in one place (as t5x's ``test_utils.get_t5_test_model``): each test names only the
dimensions its check depends on and takes the rest from here."""

from typing import Any

# dss_jax.model.T5Config fields of the tiny student: one layer per stack, float32, no dropout.
TINY_T5 = dict(
    vocab_size=64,
    d_model=16,
    d_kv=4,
    d_ff=32,
    num_heads=2,
    num_encoder_layers=1,
    num_decoder_layers=1,
    dropout_rate=0.0,
    dtype="float32",
)
# Two layers per stack and 4 heads: for checks across layers and heads (tests/gin/tiny_user.gin has its width, one layer).
SMALL_T5 = dict(TINY_T5, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=2)


def tiny_t5(**overrides: Any):
    """A ``dss_jax.model.T5Config`` of TINY_T5 with ``overrides``."""
    from dss_jax.model import T5Config

    return T5Config(**{**TINY_T5, **overrides})


def small_t5(**overrides: Any):
    """A ``dss_jax.model.T5Config`` of SMALL_T5 with ``overrides``."""
    return tiny_t5(**{**SMALL_T5, **overrides})


def logits(cfg, params, *inputs):
    """The model's logits for ``inputs`` (encoder tokens, decoder inputs, segment ids...) under one ``jax.jit``:
    eager flax runs the forward op by op, compiling each op for each new shape."""
    import jax

    from dss_jax.model import build

    return jax.jit(lambda p, *x: build(cfg).apply({"params": p}, *x))(params, *inputs)


def hf_t5_config(gated: bool = True, **overrides: Any):
    """A small ``transformers.T5Config``: v1.1-style (gated-gelu, untied head) when ``gated``, v1.0-style (relu,
    tied) otherwise; 2 + 2 layers of width 32."""
    from transformers import T5Config

    kw = dict(
        vocab_size=100,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu" if gated else "relu",
        tie_word_embeddings=not gated,
        dropout_rate=0.0,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        decoder_start_token_id=0,
    )
    return T5Config(**{**kw, **overrides})


def gemma_stack(**overrides: Any) -> dict:
    """One T5Gemma encoder or decoder stack (the ``encoder=`` / ``decoder=`` dict of ``GemmaConfig``)."""
    stack = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        query_pre_attn_scalar=12,
        sliding_window=4,
    )
    return {**stack, **overrides}


def tiny_gemma(family: str = "t5gemma2", encoder: dict | None = None, decoder: dict | None = None, **overrides: Any):
    """A ``dss_jax.gemma.GemmaConfig`` of ``family`` with gemma_stack() stacks unless given, vocabulary 64 (its last id
    the end-of-image token), float32."""
    from dss_jax.gemma import GemmaConfig

    kw = dict(vocab_size=64, dtype="float32")
    kw.update(overrides)
    kw.setdefault("eoi_token_index", kw["vocab_size"] - 1)
    return GemmaConfig(family=family, encoder=encoder or gemma_stack(), decoder=decoder or gemma_stack(), **kw)
