"""The Flax T5 computes the same function as Hugging Face's PyTorch T5 on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_t5
from factories import logits, tiny_t5

from dss_jax import convert, decoding, model


def _inputs(seed=0, vocab=100):
    rng = np.random.RandomState(seed)
    ids = rng.randint(2, vocab, size=(3, 30))
    ids[0, 20:] = 0  # padded rows: the encoder mask matters
    ids[1, 25:] = 0
    labels = rng.randint(2, vocab, size=(3, 25))
    return ids, labels


def _convert(hf, **overrides):
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    cfg = convert.config_from_hf(hf.config.to_dict(), dtype="float32", **overrides)
    return convert.hf_state_to_params(state, cfg), cfg


@pytest.mark.parametrize("gated", [False, True], ids=["t5_v1_0", "t5_v1_1"])
def test_logits_and_loss_match_hf(gated):
    hf = hf_t5(gated, enc_layers=2, dec_layers=3)
    params, cfg = _convert(hf)
    assert cfg.gated == gated and cfg.tie_word_embeddings == (not gated)
    ids, labels = _inputs()
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor((ids != 0).astype(np.int64)), labels=torch.tensor(labels)
        )
    ours = logits(cfg, params, ids, model.shift_right(labels))
    assert np.abs(np.asarray(ours) - out.logits.numpy()).max() <= 1e-4
    logp = jax.nn.log_softmax(ours)
    loss = -jnp.take_along_axis(logp, jnp.asarray(labels)[..., None], axis=-1).mean()
    assert abs(float(loss) - float(out.loss)) <= 1e-4


@pytest.mark.parametrize("gated", [False, True], ids=["t5_v1_0", "t5_v1_1"])
def test_encoder_outputs_match_hf_on_valid_positions(gated):
    hf = hf_t5(gated)
    params, cfg = _convert(hf)
    ids, _ = _inputs(1)
    mask = ids != 0
    with torch.no_grad():
        ref = hf.encoder(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))
        ).last_hidden_state.numpy()
    enc = jax.jit(lambda p, x: model.T5(cfg).apply({"params": p}, x, method=model.T5.encode))(params, jnp.asarray(ids))
    assert np.abs((np.asarray(enc) - ref)[mask]).max() <= 1e-4


@pytest.mark.parametrize("gated", [False, True], ids=["t5_v1_0", "t5_v1_1"])
def test_greedy_tokens_match_hf_generate(gated):
    hf = hf_t5(gated, seed=3)
    params, cfg = _convert(hf)
    ids, _ = _inputs(2)
    ours = np.asarray(decoding.decode(params, jnp.asarray(ids), cfg, 12))
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor((ids != 0).astype(np.int64)),
            max_new_tokens=12,
            do_sample=False,
            num_beams=1,
        ).numpy()[:, 1:]  # drop the decoder start token
    for row_ours, row_ref in zip(ours, ref, strict=True):
        n = len(row_ref)
        eos = np.where(row_ref == cfg.eos_token_id)[0]
        n = eos[0] + 1 if len(eos) else n
        np.testing.assert_array_equal(row_ours[:n], row_ref[:n])


@pytest.mark.slow
def test_scan_and_remat_compute_the_same_function():
    hf = hf_t5(True)
    params, cfg = _convert(hf)
    ids, labels = _inputs()
    ref = logits(cfg, params, ids, model.shift_right(labels))
    for policy in ("full", "minimal"):
        cfg2 = cfg.replace(scan_layers=True, remat_policy=policy)
        out = logits(cfg2, convert.stack_layers(params), ids, model.shift_right(labels))
        assert np.abs(np.asarray(out) - np.asarray(ref)).max() <= 1e-4
        grads = jax.jit(jax.grad(lambda p, c=cfg2: logits(c, p, ids, model.shift_right(labels)).sum()))(
            convert.stack_layers(params)
        )
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.slow
def test_packed_segments_do_not_see_each_other():
    """Two examples packed in one row give the same logits as each alone."""
    hf = hf_t5(True)
    params, cfg = _convert(hf)
    a_in, a_tg = np.array([5, 6, 7, 1]), np.array([8, 9, 1])
    b_in, b_tg = np.array([11, 12, 1]), np.array([13, 1])
    enc = np.concatenate([a_in, b_in, [0]])[None]
    enc_seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0]])
    tgt = np.concatenate([a_tg, b_tg, [0]])[None]
    dec_seg = np.array([[1, 1, 1, 2, 2, 0]])
    dec_in = np.array([[0, 8, 9, 0, 13, 0]])  # each segment starts with the decoder start token
    packed = logits(cfg, params, enc, dec_in, enc_seg, dec_seg)
    alone_a = logits(cfg, params, a_in[None], model.shift_right(a_tg[None]))
    alone_b = logits(cfg, params, b_in[None], model.shift_right(b_tg[None]))
    assert np.abs(np.asarray(packed[0, :3]) - np.asarray(alone_a[0])).max() <= 1e-4
    assert tgt.shape == (1, 6)
    # The second segment's relative positions start at its own offset; T5 biases depend on differences only.
    assert np.abs(np.asarray(packed[0, 3:5]) - np.asarray(alone_b[0])).max() <= 1e-4


def test_logical_axis_names_cover_every_parameter():
    from flax import linen as nn

    cfg = tiny_t5()
    boxed = jax.eval_shape(
        lambda: model.T5(cfg).init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
    )
    specs = nn.get_partition_spec(boxed["params"])
    leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    known = {"vocab", "embed", "joined_kv", "mlp", "heads", "relpos_buckets"}
    assert leaves and all(len(s) > 0 and set(s) <= known for s in leaves)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="feed_forward_proj"):
        model.T5Config(feed_forward_proj="swish")
