"""Autoregressive decoding with a key/value cache inside one jitted ``lax.while_loop``.

Greedy and temperature / top-k / top-p sampling; each row stops at its end-of-sequence token and the loop
ends when every row has. ``greedy_decode_reference`` recomputes the whole prefix at every step: it is the
slow, obviously-correct twin that the tests hold the cached path to.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from dss_jax.model import ModelConfig, build, shift_right

Array = jax.Array


def _init_cache(model: nn.Module, params: Any, encoded: Array, enc_seg: Array, batch: int, max_len: int) -> Any:
    """The decode cache: empty self-attention slots for ``max_len`` tokens, and the cross-attention keys and
    values of ``encoded``, computed here once (a one-token pass) instead of at every generated token."""
    _, variables = model.apply(
        {"params": params},
        encoded,
        enc_seg,
        jnp.zeros((batch, 1), jnp.int32),
        decode=True,
        max_decode_length=max_len,
        method="decode",
        mutable=["cache"],
    )
    return variables["cache"]


def _encode(model: nn.Module, params: Any, encoder_input_tokens: Array) -> tuple[Array, Array]:
    """(the encoder's output, its segment ids): each input is encoded once, before the loop."""
    enc_seg = (encoder_input_tokens != 0).astype(jnp.int32)
    return cast(Array, model.apply({"params": params}, encoder_input_tokens, enc_seg, method="encode")), enc_seg


def _step(
    model: nn.Module, params: Any, cache: Any, encoded: Array, enc_seg: Array, cur: Array, i: Array, max_decode_length: int
) -> tuple[Array, Any]:
    """One cached decoder step for the tokens ``cur`` (one per row) at position ``i``: logits [rows, vocab]
    and the updated cache."""
    logits, variables = model.apply(
        {"params": params, "cache": cache},
        encoded,
        enc_seg,
        cur.reshape(-1, 1),
        None,
        jnp.full((cur.size, 1), i, jnp.int32),
        decode=True,
        max_decode_length=max_decode_length,
        method="decode",
        mutable=["cache"],
    )
    return logits[:, 0], variables["cache"]


def _split_cross(cache: Any) -> tuple[dict, dict]:
    """(loop-invariant cross-attention keys/values, the rest): only the rest rides in the loop's carry."""
    flat = traverse_util.flatten_dict(cache)
    cross = {k: v for k, v in flat.items() if k[-1].startswith("cross_")}
    return cross, {k: v for k, v in flat.items() if k not in cross}


def _join(cross: dict, rest: dict) -> Any:
    return traverse_util.unflatten_dict({**cross, **rest})


def _filter_logits(logits: Array, temperature: Any, top_k: Any, top_p: Any) -> Array:
    """Temperature, then top-k, then top-p (nucleus) filtering of [batch, vocab] logits. Each setting is a
    scalar or a per-row [batch] array, and may be a traced value: one compiled program serves every setting.
    top_k 0 and top_p 1 turn their filter off; the most likely token always stays."""
    t, k, p = (jnp.asarray(x) for x in (temperature, top_k, top_p))
    t, k, p = (x[:, None] if x.ndim == 1 else x for x in (t, k, p))  # per-row settings broadcast over the vocabulary
    logits = logits / jnp.maximum(t, 1e-6)
    vocab = logits.shape[-1]
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # sorted once, descending: rank r is column r
    kth = jnp.take_along_axis(sorted_logits, jnp.broadcast_to(jnp.clip(k - 1, 0, vocab - 1), logits.shape[:-1] + (1,)), -1)
    by_k = (k > 0) & (logits < kth)
    logits = jnp.where(by_k, -jnp.inf, logits)
    sorted_logits = jnp.where((k > 0) & (sorted_logits < kth), -jnp.inf, sorted_logits)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    cutoff_idx = jnp.clip(jnp.sum(cum < p, axis=-1, keepdims=True), 0, vocab - 1)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    return jnp.where((p < 1.0) & (logits < cutoff), -jnp.inf, logits)


@functools.partial(jax.jit, static_argnames=("config", "max_decode_length", "sample", "temperature", "top_k", "top_p"))
def decode(
    params: Any,
    encoder_input_tokens: Array,
    config: ModelConfig,
    max_decode_length: int,
    rng: Array | None = None,
    sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Array:
    """Decodes [batch, max_decode_length] tokens: the EOS token is kept, positions after it are 0 (pad)."""
    model = build(config)
    batch = encoder_input_tokens.shape[0]
    encoded, enc_seg = _encode(model, params, encoder_input_tokens)
    cross, cache = _split_cross(_init_cache(model, params, encoded, enc_seg, batch, max_decode_length))
    rng = jax.random.PRNGKey(0) if rng is None else rng

    def cond(state: tuple) -> Array:
        i, _, _, _, done, _ = state
        return (i < max_decode_length) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        i, cache, tokens, cur, done, rng = state
        logits, new_cache = _step(model, params, _join(cross, cache), encoded, enc_seg, cur, i, max_decode_length)
        if sample:
            rng, step_rng = jax.random.split(rng)
            nxt = jax.random.categorical(step_rng, _filter_logits(logits, temperature, top_k, top_p), axis=-1)
        else:
            nxt = jnp.argmax(logits, axis=-1)
        nxt = jnp.where(done, 0, nxt).astype(jnp.int32)
        tokens = tokens.at[:, i].set(nxt)
        done = done | (nxt == config.eos_token_id)
        return i + 1, _split_cross(new_cache)[1], tokens, nxt, done, rng

    tokens = jnp.zeros((batch, max_decode_length), jnp.int32)
    start = jnp.full((batch,), config.decoder_start_token_id, jnp.int32)
    state = (jnp.array(0, jnp.int32), cache, tokens, start, jnp.zeros((batch,), bool), rng)
    return jax.lax.while_loop(cond, body, state)[2]


@functools.partial(jax.jit, static_argnames=("config", "max_decode_length"))
def decode_rows(
    params: Any,
    encoder_input_tokens: Array,
    config: ModelConfig,
    max_decode_length: int,
    seeds: Array,
    temperature: Array,
    top_k: Array,
    top_p: Array,
    max_tokens: Array,
) -> Array:
    """:func:`decode` with its own sampling settings per row, all traced [batch] arrays, so only the shapes
    (batch, input length, ``max_decode_length``) compile, never the values. Row r with temperature 0 is greedy;
    otherwise step i samples with ``fold_in(PRNGKey(seeds[r]), i)``, so a row's tokens do not depend on the rows
    beside it. Row r stops at its EOS or after ``max_tokens[r]`` tokens; positions after that are 0 (pad)."""
    model = build(config)
    batch = encoder_input_tokens.shape[0]
    encoded, enc_seg = _encode(model, params, encoder_input_tokens)
    cross, cache = _split_cross(_init_cache(model, params, encoded, enc_seg, batch, max_decode_length))
    keys = jax.vmap(jax.random.PRNGKey)(seeds.astype(jnp.uint32))
    temperature = temperature.astype(jnp.float32)
    sampled = temperature > 0

    def cond(state: tuple) -> Array:
        i, _, _, _, done = state
        return (i < max_decode_length) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        i, cache, tokens, cur, done = state
        logits, new_cache = _step(model, params, _join(cross, cache), encoded, enc_seg, cur, i, max_decode_length)
        logits = logits.astype(jnp.float32)
        filtered = _filter_logits(logits, jnp.where(sampled, temperature, 1.0), top_k, top_p)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)
        drawn = jax.vmap(jax.random.categorical)(step_keys, filtered)
        nxt = jnp.where(sampled, drawn, jnp.argmax(logits, axis=-1))
        nxt = jnp.where(done, 0, nxt).astype(jnp.int32)
        tokens = tokens.at[:, i].set(nxt)
        done = done | (nxt == config.eos_token_id) | (i + 1 >= max_tokens)
        return i + 1, _split_cross(new_cache)[1], tokens, nxt, done

    tokens = jnp.zeros((batch, max_decode_length), jnp.int32)
    start = jnp.full((batch,), config.decoder_start_token_id, jnp.int32)
    state = (jnp.array(0, jnp.int32), cache, tokens, start, max_tokens <= 0)
    return jax.lax.while_loop(cond, body, state)[2]


@functools.partial(jax.jit, static_argnames=("config",))
def _teacher_forced_logits(params: Any, encoder_input_tokens: Array, tokens: Array, config: ModelConfig) -> Array:
    """Logits of every position of ``tokens`` fed shifted right, compiled once per config and shape."""
    decoder_input_tokens = shift_right(tokens, config.decoder_start_token_id)
    return cast(Array, build(config).apply({"params": params}, encoder_input_tokens, decoder_input_tokens))


def greedy_decode_reference(params: Any, encoder_input_tokens: Array, config: ModelConfig, max_decode_length: int) -> Array:
    """Greedy decoding that re-runs the full teacher-forced model on the whole prefix at every step."""
    batch = encoder_input_tokens.shape[0]
    tokens = jnp.zeros((batch, max_decode_length), jnp.int32)
    done = jnp.zeros((batch,), bool)
    for i in range(max_decode_length):
        logits = _teacher_forced_logits(params, encoder_input_tokens, tokens, config)
        nxt = jnp.where(done, 0, jnp.argmax(logits[:, i], axis=-1)).astype(jnp.int32)
        tokens = tokens.at[:, i].set(nxt)
        done = done | (nxt == config.eos_token_id)
    return tokens


def length_penalty(length: Array, alpha: float) -> Array:
    """GNMT's ((5 + length) / 6) ** alpha, as T5X uses; alpha = 0 ranks by log probability alone."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


_PER_ROW = ("cached_key", "cached_value")  # the self-attention slots: one row per beam


def _per_beam(cache: dict, beams: int, axis: int) -> dict:
    """A decode cache made for one row per input, with its self-attention slots repeated for each beam (the
    cross-attention keys and values stay once per input: see ``model.per_input_cross``)."""
    return {name: jnp.repeat(x, beams, axis=axis) if name[-1] in _PER_ROW else x for name, x in cache.items()}


def _gather_beams(cache: dict, beam_idx: Array, batch: int, beams: int, axis: int) -> dict:
    """Reorders the (batch * beams) rows of the self-attention slots of a flattened cache by the chosen parents."""
    flat_idx = (jnp.arange(batch)[:, None] * beams + beam_idx).reshape(-1)
    return {name: jnp.take(x, flat_idx, axis=axis) if name[-1] in _PER_ROW else x for name, x in cache.items()}


@functools.partial(jax.jit, static_argnames=("config", "max_decode_length", "num_beams", "alpha"))
def beam_search(
    params: Any, encoder_input_tokens: Array, config: ModelConfig, max_decode_length: int, num_beams: int = 4, alpha: float = 0.6
) -> tuple[Array, Array]:
    """Beam search with a length penalty; returns (tokens [batch, beams, length] best first, scores [batch, beams]).

    A hypothesis ends at its EOS token; the loop stops when no live beam can still beat the finished ones.
    """
    model = build(config)
    batch, k, vocab = encoder_input_tokens.shape[0], num_beams, config.vocab_size
    # each input encoded once, its cross-attention keys and values kept once and read by all its beams
    encoded, enc_seg = _encode(model, params, encoder_input_tokens)
    cross, cache = _split_cross(_init_cache(model, params, encoded, enc_seg, batch, max_decode_length))
    cache_axis = 1 if config.scan_layers else 0
    cache = _per_beam(cache, k, cache_axis)
    neg = jnp.array(-1e9, jnp.float32)

    def cond(s: tuple) -> Array:
        i, _, _, alive_lp, _, fin_scores, _ = s
        best_alive = jnp.max(alive_lp, axis=1) / length_penalty(jnp.array(max_decode_length), alpha)
        worst_fin = jnp.min(fin_scores, axis=1)
        return (i < max_decode_length) & ~jnp.all(worst_fin >= best_alive)

    def body(s: tuple) -> tuple:
        i, cache, alive_seq, alive_lp, fin_seq, fin_scores, cur = s
        logits, new_cache = _step(model, params, _join(cross, cache), encoded, enc_seg, cur, i, max_decode_length)
        logp = jax.nn.log_softmax(logits).reshape(batch, k, vocab)
        cand = (alive_lp[:, :, None] + logp).reshape(batch, k * vocab)
        top_lp, top_idx = jax.lax.top_k(cand, 2 * k)
        parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        seqs = jnp.take_along_axis(alive_seq, parent[:, :, None], axis=1).at[:, :, i].set(token)
        is_eos = token == config.eos_token_id
        # live: the best k candidates that did not end
        live_lp = jnp.where(is_eos, neg, top_lp)
        live_lp, live_pos = jax.lax.top_k(live_lp, k)
        new_alive_seq = jnp.take_along_axis(seqs, live_pos[:, :, None], axis=1)
        new_parent = jnp.take_along_axis(parent, live_pos, axis=1)
        new_cur = jnp.take_along_axis(token, live_pos, axis=1)
        # finished: merge those that ended now with the earlier ones, keep the best k
        # as in Hugging Face's beam search, an EOS candidate finishes only when it ranks among the top k
        in_top_k = jnp.arange(2 * k)[None, :] < k
        end_scores = jnp.where(is_eos & in_top_k, top_lp / length_penalty(i + 1, alpha), neg)
        all_scores = jnp.concatenate([fin_scores, end_scores], axis=1)
        all_seqs = jnp.concatenate([fin_seq, seqs], axis=1)
        fin_scores, fin_pos = jax.lax.top_k(all_scores, k)
        fin_seq = jnp.take_along_axis(all_seqs, fin_pos[:, :, None], axis=1)
        cache = _gather_beams(_split_cross(new_cache)[1], new_parent, batch, k, cache_axis)
        return i + 1, cache, new_alive_seq, live_lp, fin_seq, fin_scores, new_cur

    alive_lp = jnp.tile(jnp.array([0.0] + [-1e9] * (k - 1), jnp.float32), (batch, 1))
    seq0 = jnp.zeros((batch, k, max_decode_length), jnp.int32)
    state = (
        jnp.array(0, jnp.int32),
        cache,
        seq0,
        alive_lp,
        seq0,
        jnp.full((batch, k), neg),
        jnp.full((batch, k), config.decoder_start_token_id, jnp.int32),
    )
    _, _, alive_seq, alive_lp, fin_seq, fin_scores, _ = jax.lax.while_loop(cond, body, state)
    # live beams that reached the length limit compete with the finished ones
    alive_scores = alive_lp / length_penalty(jnp.array(max_decode_length), alpha)
    scores, pos = jax.lax.top_k(jnp.concatenate([fin_scores, alive_scores], axis=1), k)
    seqs = jnp.take_along_axis(jnp.concatenate([fin_seq, alive_seq], axis=1), pos[:, :, None], axis=1)
    return seqs, scores


@functools.partial(jax.jit, static_argnames=("config",))
def sequence_log_prob(params: Any, encoder_input_tokens: Array, tokens: Array, config: ModelConfig) -> Array:
    """Teacher-forced log probability of each row of ``tokens`` (through its EOS), for tests and rescoring."""
    logits = _teacher_forced_logits(params, encoder_input_tokens, tokens, config)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1)[..., 0]
    after_eos = jnp.cumsum(tokens == config.eos_token_id, axis=1) - (tokens == config.eos_token_id)
    return jnp.sum(jnp.where(after_eos > 0, 0.0, lp), axis=1)


@functools.partial(jax.jit, static_argnames=("config",))
def choice_log_probs(params: Any, encoder_input_tokens: Array, choice_tokens: Array, config: ModelConfig) -> Array:
    """Rank classification's scores: the summed log probability of each candidate target, as seqio's
    rank-classification scores them (no length normalisation). ``choice_tokens`` is [batch, choices, length],
    each row a choice's tokens through its EOS, 0-padded; an all-zero row scores -inf. Each input is encoded once
    and its encoding shared by its choices."""
    model = build(config)
    b, c, t = choice_tokens.shape
    encoded, enc_seg = _encode(model, params, encoder_input_tokens)
    encoded = jnp.repeat(encoded, c, axis=0)
    targets = choice_tokens.reshape(b * c, t)
    logits = cast(
        Array,
        model.apply(
            {"params": params},
            encoded,
            jnp.repeat(enc_seg, c, axis=0),
            shift_right(targets, config.decoder_start_token_id),
            method="decode",
        ),
    )
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), targets[..., None], axis=-1)[..., 0]
    scores = jnp.sum(jnp.where(targets > 0, lp, 0.0), axis=1).reshape(b, c)
    return jnp.where(jnp.any(choice_tokens > 0, axis=-1), scores, -jnp.inf)


def pad_rows(rows: Sequence[Any], batch_size: int, length: int) -> np.ndarray:
    """Token rows (of any lengths up to ``length``) zero-padded into a fixed [batch_size, length] int32 batch, so
    every batch of a run has one shape and compiles once; rows past ``batch_size`` are an error."""
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {batch_size}")
    batch = np.zeros((batch_size, length), np.int32)
    for i, r in enumerate(rows):
        batch[i, : len(r)] = r
    return batch


def cut_at_eos(row: Sequence[int], eos: int) -> tuple[list[int], bool]:
    """The ids before the first ``eos`` and whether there was one (a row without it ran to the length limit)."""
    row = list(row)
    return (row[: row.index(eos)], True) if eos in row else (row, False)


def decode_and_cut(
    params: Any,
    rows: Sequence[Any],
    config: ModelConfig,
    *,
    length: int,
    batch_size: int,
    max_decode_length: int,
    num_beams: int = 1,
    alpha: float = 0.6,
    place: Callable[[np.ndarray], Any] | None = None,
) -> list[list[int]]:
    """Each input row's output ids, cut before EOS: rows padded into [batch_size, length] batches, decoded
    greedily (``num_beams`` 1) or by beam search (the best beam). ``place`` puts a padded batch on the mesh the
    parameters live on (default: as is)."""
    out: list[list[int]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = pad_rows(chunk, batch_size, length)
        enc = place(batch) if place is not None else batch
        if num_beams > 1:
            tokens = beam_search(params, enc, config, max_decode_length, num_beams, alpha)[0][:, 0]
        else:
            tokens = decode(params, enc, config, max_decode_length)
        out += [cut_at_eos(row, config.eos_token_id)[0] for row in np.asarray(jax.device_get(tokens))[: len(chunk)].tolist()]
    return out
