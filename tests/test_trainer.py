"""The partitioned trainer: sharded = single-device, state is sharded, microbatching, per-task loss."""

import json

import gin
import jax
import numpy as np
import pytest
from conftest import TOY_GIN as GIN
from factories import tiny_t5

from dss_jax import gin_utils, losses, train

# for tests that compare train losses: no validation pass or end-of-run evaluation to compile
NO_EVAL = ("train.train.eval_every = 0", "train.train.evaluate_test = False")


def _train(tmp_path, name, toy, *bindings):
    gin.clear_config()
    gin_utils.parse_gin([GIN], [f"USER_TRAIN = '{toy}'", *bindings])
    try:
        summary = train.train(str(tmp_path / name))
    finally:
        gin.clear_config()
    rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    return summary, [r["loss"] for r in rows if r["kind"] == "train"], rows


@pytest.mark.slow
def test_sharded_mesh_matches_single_device_and_shards_state(tmp_path, toy_jsonl, monkeypatch):
    assert jax.device_count() == 8
    _, single, _ = _train(tmp_path, "one", toy_jsonl, *NO_EVAL)
    captured = {}
    real_jit = train.trainer.jit_train_step

    def spy(*args, **kw):
        fn = real_jit(*args, **kw)
        captured["layout"] = args[5]
        return fn

    monkeypatch.setattr(train.trainer, "jit_train_step", spy)
    _, sharded, _ = _train(
        tmp_path,
        "mesh",
        toy_jsonl,
        *NO_EVAL,
        "partitioning.MeshConfig.data = 2",
        "partitioning.MeshConfig.fsdp = 2",
        "partitioning.MeshConfig.model = 2",
    )
    assert len(single) == len(sharded) == 20
    np.testing.assert_allclose(sharded, single, rtol=1e-4)
    # parameters and optimizer state are really sharded over fsdp and model
    layout = captured["layout"]
    wi = layout.shardings.params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert wi.spec == jax.sharding.PartitionSpec("fsdp", "model")
    emb = layout.shardings.params["token_embedder"]["embedding"]
    assert emb.spec == jax.sharding.PartitionSpec("model", "fsdp")
    mu = layout.shardings.opt_state[1][0].mu["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert mu.spec == jax.sharding.PartitionSpec("fsdp", "model")


@pytest.mark.slow
def test_microbatching_gives_the_same_losses(tmp_path, toy_jsonl):
    _, full, _ = _train(
        tmp_path,
        "full",
        toy_jsonl,
        "TRAIN_STEPS = 6",
        "model.T5Config.dropout_rate = 0.0",
        *NO_EVAL,
    )
    _, micro, _ = _train(
        tmp_path,
        "micro",
        toy_jsonl,
        "TRAIN_STEPS = 6",
        "model.T5Config.dropout_rate = 0.0",
        "train.train.microbatches = 4",
        *NO_EVAL,
    )
    np.testing.assert_allclose(micro, full, rtol=1e-4)


@pytest.mark.slow
def test_training_learns_the_toy_task_and_reports_eval(tmp_path, toy_jsonl):
    summary, losses_, rows = _train(
        tmp_path,
        "learn",
        toy_jsonl,
        "TRAIN_STEPS = 60",
        "optim.learning_rate_schedule.base_learning_rate = 3e-3",  # as the toy student (conftest) learns
        "train.train.eval_every = 30",
        "train.train.checkpoint_every = 30",
        "train.train.report_train_examples = 50",
    )
    # the final report names a subset as one and scores the whole validation split
    train_row, val_row = summary["splits"]["train"], summary["splits"]["validation"]
    assert (train_row["examples"], train_row["total"], train_row["subset"]) == (50, 180, True)
    assert (val_row["examples"], val_row["total"], val_row["subset"]) == (20, 20, False)
    assert val_row["accuracy"] == pytest.approx(val_row["teacher_forced_accuracy"])  # greedy EM == teacher-forced EM
    assert any(k.startswith("most frequent training label") for k in summary["baselines"])
    assert (tmp_path / "learn" / "loss_curves.png").exists()
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert all(r["examples_per_sec"] > 0 and r["real_tokens_per_sec"] > r["examples_per_sec"] for r in train_rows)
    assert losses_[-1] < 0.5 * losses_[0]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [30, 60]
    assert {"toy_label_gold/accuracy", "toy_label_gold/label_loss", "toy_rationale/rationale_loss"} <= set(evals[-1])
    assert summary["best_step"] in (30, 60)
    assert (tmp_path / "learn" / "test_metrics.json").exists() is False  # the toy data has no test split
    assert (tmp_path / "learn" / "config.gin").read_text().count("USER_TRAIN") >= 1


def test_task_weighted_loss_is_the_papers_objective():
    import jax.numpy as jnp

    tl = jnp.array([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0]])
    w = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    tids = jnp.array([[1, 1, 2, 2], [2, 2, 0, 0]])
    counts = losses.task_token_counts(w, tids)
    got = losses.weighted_loss(tl, w, tids, counts, losses.LossConfig(alpha=0.3))
    label_mean, rationale_mean = (1 + 2) / 2, (3 + 4 + 10 + 20) / 4
    assert abs(float(got) - (0.3 * label_mean + 0.7 * rationale_mean)) < 1e-6
    tm = losses.weighted_loss(tl, w, tids, counts, losses.LossConfig(mode="token_mean"))
    assert abs(float(tm) - 40 / 6) < 1e-6
    only_label = losses.weighted_loss(
        tl, w, jnp.where(tids > 0, 1, 0), losses.task_token_counts(w, jnp.where(tids > 0, 1, 0)), losses.LossConfig(alpha=0.3)
    )
    assert abs(float(only_label) - 40 / 6) < 1e-6  # no rationale tokens: plain label mean


def test_label_smoothing_and_z_loss():
    import jax.numpy as jnp

    logits = jnp.array([[[2.0, 0.5, -1.0, 0.0]]])
    tgt = jnp.array([[0]])
    plain = losses.token_losses(logits, tgt)
    assert abs(float(plain[0, 0]) - float(-jax.nn.log_softmax(logits)[0, 0, 0])) < 1e-6
    assert float(losses.token_losses(logits, tgt, z_loss=1e-2)[0, 0]) > float(plain[0, 0])
    assert float(losses.token_losses(logits, tgt, label_smoothing=0.1)[0, 0]) != float(plain[0, 0])


def test_bad_mesh_and_unknown_axis_names_fail_clearly():
    from dss_jax import partitioning

    with pytest.raises(ValueError, match="devices"):
        partitioning.make_mesh(partitioning.MeshConfig(data=3, fsdp=3, model=1))
    with pytest.raises(ValueError, match="without a partitioning rule: \\['mystery'\\]"):
        partitioning.validate_names({"w": jax.sharding.PartitionSpec("embed", "mystery")}, partitioning.DEFAULT_RULES)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 4])
def test_microbatches_split_every_devices_rows_without_gathering_the_batch(k):
    """On 8 data-parallel devices each microbatch holds batch / 8 / k rows per device and nothing is all-gathered."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    from common import synthetic_batch

    from dss_jax import optim, partitioning, trainer

    cfg = tiny_t5(d_model=24, d_kv=8, d_ff=48, num_heads=3)
    tx = optim.make_optimizer("adamw", learning_rate=1e-3)
    mc = partitioning.MeshConfig(data=8, fsdp=1, model=1)
    mesh = partitioning.make_mesh(mc)
    layout = trainer.state_layout(cfg, tx, mesh, mc.rules)
    bsh = partitioning.batch_sharding(mesh, mc.rules)
    batch = synthetic_batch(64, 40, 12, cfg.vocab_size, fill=0.6)
    with jax.set_mesh(mesh):
        state = trainer.init_state(cfg, tx, layout, 0)
        gbatch = partitioning.global_batch(batch, bsh)
        step = trainer.jit_train_step(cfg, tx, losses.LossConfig(), k, 0, layout, bsh, mesh)
        hlo = step.lower(state, gbatch).compile().as_text()
        _, metrics = step(state, gbatch)
        state1 = trainer.init_state(cfg, tx, layout, 0)
        _, ref = trainer.jit_train_step(cfg, tx, losses.LossConfig(), 1, 0, layout, bsh, mesh)(state1, gbatch)
    assert "all-gather" not in hlo
    rows = 64 // 8 // k
    assert f"f32[{rows},40,24]" in hlo  # the encoder's activations: this device's rows of one microbatch
    assert f"f32[{64 // k},40,24]" not in hlo
    for key in ("loss", "label_loss", "rationale_loss", "grad_norm"):
        np.testing.assert_allclose(metrics[key], ref[key], rtol=1e-5)
