"""Cached decoding equals recomputing the prefix; beam search and sampling behave."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from factories import small_t5, tiny_gemma

from dss_jax import convert, decoding, flops, model

CFG = small_t5(vocab_size=40, relative_attention_num_buckets=8, relative_attention_max_distance=16)


def _ragged(seed, batch=4, length=12):
    rng = np.random.RandomState(seed)
    ids = rng.randint(2, CFG.vocab_size, size=(batch, length))
    for i in range(batch):
        ids[i, rng.randint(2, length) :] = 0  # rows of different lengths
    return jnp.asarray(ids)


# scanned layers with each head (tied, untied) and feed-forward (gated, relu); unrolled layers once (the cache's
# layout differs by scan_layers, not by head or feed-forward); relu's case in `make test` only
@pytest.mark.parametrize("seed, scan", [(0, False), (0, True), (1, True), pytest.param(2, True, marks=pytest.mark.slow)])
def test_cached_greedy_equals_recompute_reference(seed, scan):
    cfg = CFG.replace(
        scan_layers=scan, tie_word_embeddings=bool(seed % 2), feed_forward_proj="relu" if seed == 2 else "gated-gelu"
    )
    params = model.init_params(cfg.replace(scan_layers=False), jax.random.PRNGKey(seed))
    ids = _ragged(seed)
    ref = decoding.greedy_decode_reference(params, ids, cfg.replace(scan_layers=False), 10)
    got = decoding.decode(convert.stack_layers(params) if scan else params, ids, cfg, 10)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


@pytest.mark.parametrize("family", ["t5", "t5gemma", "t5gemma2"])
def test_cross_attention_kept_once_per_input_equals_once_per_beam(family):
    """Beam search keeps the encoder's keys and values once per input; each step's logits equal those of a cache
    that repeats them for every beam (T5 cross-attention, T5Gemma cross, T5Gemma 2 merged attention)."""
    cfg = CFG if family == "t5" else tiny_gemma(family)
    m, params = model.build(cfg), model.init_params(cfg, jax.random.PRNGKey(0))
    ids, beams, length = _ragged(4, batch=3, length=9), 2, 5
    # jitted as decode and beam_search run them (eager flax dispatches op by op: ~20 s a family)
    init = jax.jit(lambda e, s: decoding._init_cache(m, params, e, s, e.shape[0], length))
    step = jax.jit(lambda c, e, s, cur, i: decoding._step(m, params, c, e, s, cur, i, length))
    encoded, seg = jax.jit(lambda x: decoding._encode(m, params, x))(ids)
    repeated = init(jnp.repeat(encoded, beams, 0), jnp.repeat(seg, beams, 0))
    cross, rest = decoding._split_cross(init(encoded, seg))
    assert all(x.shape[0] == 3 for x in cross.values())
    once = decoding._join(cross, decoding._per_beam(rest, beams, 0))
    cur = jnp.asarray(np.random.RandomState(5).randint(2, 40, size=3 * beams), jnp.int32)
    rep_enc, rep_seg = jnp.repeat(encoded, beams, 0), jnp.repeat(seg, beams, 0)
    for i in range(3):
        want, repeated = step(repeated, rep_enc, rep_seg, cur, jnp.int32(i))
        got, once = step(once, encoded, seg, cur, jnp.int32(i))
        # equal up to float32 rounding: the two caches hold the same values at other batch shapes
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
        cur = jnp.argmax(got, -1).astype(jnp.int32)


def _loop_instructions(hlo_text: str) -> dict[str, str]:
    """Instruction name -> right-hand side, over every while-loop body of an optimized HLO module."""
    hlo = flops.Hlo.parse(hlo_text)
    bodies = {m[3] for lines in hlo.comps.values() for line in lines if (m := flops._WHILE.search(line))}
    return {name: rhs for body in bodies for name, rhs in hlo.defs(body).items()}


@pytest.mark.parametrize("family", ["t5", "t5gemma"])
def test_decode_steps_read_the_caches_in_place(family):
    """No decode step re-lays out a cache: the compiled loop holds no transpose or copy the size of a layer's
    self-attention slots or cross-attention keys (each such copy would read and write the whole cache per step)."""
    cfg = CFG if family == "t5" else tiny_gemma(family)
    batch, enc_len, dec_len = 3, 20, 12
    params = jax.eval_shape(lambda r: model.init_params(cfg, r), jax.random.PRNGKey(0))
    ids = jax.ShapeDtypeStruct((batch, enc_len), jnp.int32)
    body = _loop_instructions(decoding.decode.lower(params, ids, cfg, dec_len).compile().as_text())
    assert any(flops._opcode(rhs) == "fusion" for rhs in body.values())  # the loop body was found
    heads, d = (cfg.num_heads, cfg.d_kv) if family == "t5" else (cfg.decoder.num_key_value_heads, cfg.decoder.head_dim)
    sizes = {batch * heads * n * d for n in (enc_len, dec_len)}
    relaid = []
    for name, rhs in body.items():
        shape = re.match(r"\w+\[([\d,]+)\]", rhs)
        if shape and ("transpose" in name or flops._opcode(rhs) in ("transpose", "copy")):
            if int(np.prod([int(x) for x in shape[1].split(",")])) in sizes:
                relaid.append(f"{name} = {rhs[:100]}")
    assert not relaid, relaid


def test_rows_stop_at_their_eos():
    params = model.init_params(CFG, jax.random.PRNGKey(0))
    # make EOS the argmax after a couple of steps for some rows by biasing the output head
    params = jax.tree.map(lambda x: x, params)
    params["decoder"]["logits_dense"]["kernel"] = params["decoder"]["logits_dense"]["kernel"].at[:, CFG.eos_token_id].add(0.3)
    out = np.asarray(decoding.decode(params, _ragged(3), CFG, 10))
    for row in out:
        if CFG.eos_token_id in row:
            assert (row[list(row).index(CFG.eos_token_id) + 1 :] == 0).all()


def test_beam_of_one_is_greedy_and_wider_beams_score_at_least_as_well():
    params = model.init_params(CFG, jax.random.PRNGKey(4))
    ids = _ragged(4)
    greedy = decoding.decode(params, ids, CFG, 8)
    b1, _ = decoding.beam_search(params, ids, CFG, 8, num_beams=1, alpha=0.0)
    np.testing.assert_array_equal(np.asarray(b1[:, 0]), np.asarray(greedy))
    b4, s4 = decoding.beam_search(params, ids, CFG, 8, num_beams=4, alpha=0.0)
    lp_greedy = np.asarray(decoding.sequence_log_prob(params, ids, greedy, CFG))
    lp_beam = np.asarray(decoding.sequence_log_prob(params, ids, b4[:, 0], CFG))
    assert (lp_beam >= lp_greedy - 1e-5).all()
    np.testing.assert_allclose(np.asarray(s4[:, 0]), lp_beam, atol=1e-4)  # alpha = 0: score is the log prob
    assert (np.diff(np.asarray(s4), axis=1) <= 1e-6).all()  # best first


def test_sampling_top_k_one_is_greedy_and_seeded():
    params = model.init_params(CFG, jax.random.PRNGKey(5))
    ids = _ragged(5)
    greedy = decoding.decode(params, ids, CFG, 8)
    s = decoding.decode(params, ids, CFG, 8, rng=jax.random.PRNGKey(1), sample=True, top_k=1)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(greedy))
    a = decoding.decode(params, ids, CFG, 8, rng=jax.random.PRNGKey(7), sample=True, temperature=2.0, top_p=0.9)
    b = decoding.decode(params, ids, CFG, 8, rng=jax.random.PRNGKey(7), sample=True, temperature=2.0, top_p=0.9)
    c = decoding.decode(params, ids, CFG, 8, rng=jax.random.PRNGKey(8), sample=True, temperature=2.0, top_p=0.9)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_top_p_keeps_the_smallest_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(decoding._filter_logits(logits, 1.0, 0, 0.75)))
    assert kept.tolist() == [[True, True, False, False]]
