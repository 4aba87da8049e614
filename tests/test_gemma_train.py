"""A T5Gemma 2 student through the trainer: sharded on a data x fsdp x model mesh, bf16, dropout, scanned and
rematerialised layers of mixed types. The loss falls on a repeated batch and every parameter is sharded by the
existing logical-axis rules."""

from __future__ import annotations

import sys

import jax
import numpy as np
import pytest
from factories import gemma_stack, logits, tiny_gemma

from dss_jax import losses


@pytest.mark.slow
def test_t5gemma2_trains_sharded_with_scan_and_remat():
    from conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    from common import synthetic_batch

    from dss_jax import optim, partitioning, trainer

    cfg = tiny_gemma(
        "t5gemma2",
        encoder=gemma_stack(num_hidden_layers=3, layer_types=("sliding_attention", "sliding_attention", "full_attention")),
        decoder=gemma_stack(layer_types=("sliding_attention", "full_attention")),
        dropout_rate=0.1,
        scan_layers=True,
        remat_policy="full",
        dtype="bfloat16",
    )
    tx = optim.make_optimizer("adamw", learning_rate=3e-3)
    mc = partitioning.MeshConfig(data=2, fsdp=2, model=2)
    mesh = partitioning.make_mesh(mc)
    layout = trainer.state_layout(cfg, tx, mesh, mc.rules)
    specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(layout.shardings.params)}
    assert any("model" in str(s) for k, s in specs.items() if "q_proj" in k)
    assert any("fsdp" in str(s) for k, s in specs.items() if "embedding" in k)
    bsh = partitioning.batch_sharding(mesh, mc.rules)
    batch = synthetic_batch(8, 16, 8, cfg.vocab_size, fill=0.75)
    with jax.set_mesh(mesh):
        state = trainer.init_state(cfg, tx, layout, 0)
        gbatch = partitioning.global_batch(batch, bsh)
        step = trainer.jit_train_step(cfg, tx, losses.LossConfig(), 2, 0, layout, bsh, mesh)
        seen = []
        for _ in range(8):
            state, metrics = step(state, gbatch)
            seen.append(float(metrics["loss"]))
    assert np.all(np.isfinite(seen)) and seen[-1] < seen[0] * 0.8, seen


@pytest.mark.parametrize("family", ["t5gemma", "t5gemma2"])
def test_from_scratch_loss_starts_near_uniform(family):
    """A freshly initialised student's loss is near ln(vocab), not hundreds (tied head, no softcap in T5Gemma 2)."""
    from dss_jax import model

    stack = gemma_stack(hidden_size=64, intermediate_size=96, head_dim=16, query_pre_attn_scalar=16)
    vocab = 4096
    cfg = tiny_gemma(family, encoder=stack, decoder=stack, vocab_size=vocab)
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    enc, tgt = rng.integers(3, vocab, (4, 16)), rng.integers(3, vocab, (4, 8))
    out = logits(cfg, params, enc, model.shift_right(tgt, cfg.decoder_start_token_id))
    loss = float(np.mean(-np.take_along_axis(np.asarray(jax.nn.log_softmax(out)), tgt[..., None], -1)))
    assert loss < 1.5 * np.log(vocab), loss
