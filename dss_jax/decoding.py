"""Autoregressive decoding with a key/value cache inside one jitted ``lax.while_loop``.

Greedy and temperature / top-k / top-p sampling; each row stops at its end-of-sequence token and the loop
ends when every row has. ``greedy_decode_reference`` recomputes the whole prefix at every step: it is the
slow, obviously-correct twin that the tests hold the cached path to.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from dss_jax.model import T5, T5Config, shift_right

Array = jax.Array


def _init_cache(model: T5, params: Any, encoded: Array, enc_seg: Array, batch: int, max_len: int) -> Any:
    """Zero cache of the right shapes, found with eval_shape so no full-length forward pass runs."""

    def init() -> Any:
        _, variables = model.apply(
            {"params": params},
            encoded,
            enc_seg,
            jnp.zeros((batch, max_len), jnp.int32),
            decode=True,
            max_decode_length=max_len,
            method=T5.decode,
            mutable=["cache"],
        )
        return variables["cache"]

    shapes = jax.eval_shape(init)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _filter_logits(logits: Array, temperature: float, top_k: int, top_p: float) -> Array:
    logits = logits / jnp.maximum(temperature, 1e-6)
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


@functools.partial(jax.jit, static_argnames=("config", "max_decode_length", "sample", "temperature", "top_k", "top_p"))
def decode(
    params: Any,
    encoder_input_tokens: Array,
    config: T5Config,
    max_decode_length: int,
    rng: Array | None = None,
    sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Array:
    """Decodes [batch, max_decode_length] tokens: the EOS token is kept, positions after it are 0 (pad)."""
    model = T5(config)
    batch = encoder_input_tokens.shape[0]
    enc_seg = (encoder_input_tokens != 0).astype(jnp.int32)
    encoded = model.apply({"params": params}, encoder_input_tokens, enc_seg, method=T5.encode)
    cache = _init_cache(model, params, encoded, enc_seg, batch, max_decode_length)
    rng = jax.random.PRNGKey(0) if rng is None else rng

    def cond(state: tuple) -> Array:
        i, _, _, _, done, _ = state
        return (i < max_decode_length) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        i, cache, tokens, cur, done, rng = state
        logits, variables = model.apply(
            {"params": params, "cache": cache},
            encoded,
            enc_seg,
            cur[:, None],
            None,
            jnp.full((batch, 1), i, jnp.int32),
            decode=True,
            max_decode_length=max_decode_length,
            method=T5.decode,
            mutable=["cache"],
        )
        logits = logits[:, 0]
        if sample:
            rng, step_rng = jax.random.split(rng)
            nxt = jax.random.categorical(step_rng, _filter_logits(logits, temperature, top_k, top_p), axis=-1)
        else:
            nxt = jnp.argmax(logits, axis=-1)
        nxt = jnp.where(done, 0, nxt).astype(jnp.int32)
        tokens = tokens.at[:, i].set(nxt)
        done = done | (nxt == config.eos_token_id)
        return i + 1, variables["cache"], tokens, nxt, done, rng

    tokens = jnp.zeros((batch, max_decode_length), jnp.int32)
    start = jnp.full((batch,), config.decoder_start_token_id, jnp.int32)
    state = (jnp.array(0, jnp.int32), cache, tokens, start, jnp.zeros((batch,), bool), rng)
    return jax.lax.while_loop(cond, body, state)[2]


def greedy_decode_reference(params: Any, encoder_input_tokens: Array, config: T5Config, max_decode_length: int) -> Array:
    """Greedy decoding that re-runs the full teacher-forced model on the whole prefix at every step."""
    model = T5(config)
    apply = jax.jit(lambda p, e, d: model.apply({"params": p}, e, d))
    batch = encoder_input_tokens.shape[0]
    tokens = jnp.zeros((batch, max_decode_length), jnp.int32)
    done = jnp.zeros((batch,), bool)
    for i in range(max_decode_length):
        logits = apply(params, encoder_input_tokens, shift_right(tokens, config.decoder_start_token_id))
        nxt = jnp.where(done, 0, jnp.argmax(logits[:, i], axis=-1)).astype(jnp.int32)
        tokens = tokens.at[:, i].set(nxt)
        done = done | (nxt == config.eos_token_id)
    return tokens
