"""dss-plan's FLOP counts: the model's useful work by hand, and compiled loops counted by their trip counts."""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

from dss_jax import batching, configs, flops, losses, partitioning, trainer
from dss_jax.model import T5Config


def test_model_flops_match_a_hand_count():
    cfg = T5Config(vocab_size=100, d_model=8, d_kv=4, d_ff=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1)
    got = flops.model_flops(cfg, enc_len=[3, 5], dec_len=[2, 1])
    # per token: encoder q,k,v,o 4*8*8 = 256 + gated MLP 3*8*16 = 384, and the decoder's cross-attention k,v of its
    # output 2*8*8 = 128 -> 768; decoder self 256 + cross q,o 128 + MLP 384 + output head 8*100 = 800 -> 1568.
    # Tokens: 8 encoder, 3 decoder. 6 * (768*8 + 1568*3) = 65088.
    assert got["matmul"] == 65088
    # attention, width 2 heads * 4 = 8: encoder pairs 3*3 + 5*5 = 34; causal decoder 2*3/2 + 1*2/2 = 4;
    # cross 2*3 + 1*5 = 11. Forward 4 * 8 * 49 = 1568, training 3x = 4704.
    assert got["attention"] == 4704
    assert got["total"] == 65088 + 4704 and got["tokens"] == 11


def _loop_program(strip_annotation: bool) -> str:
    w = jnp.ones((16, 16), jnp.float32)
    f = jax.jit(lambda x: jax.lax.fori_loop(0, 7, lambda i, y: jnp.tanh(y @ w), x))
    text = f.lower(jax.ShapeDtypeStruct((4, 16), jnp.float32)).compile().as_text()
    if strip_annotation:  # the TPU's optimized HLO has no known_trip_count: read it from the loop itself
        text = re.sub(r', backend_config=\{"dynamic_variables".*?"known_trip_count":\{"n":"\d+"\}\}', "", text)
        assert "known_trip_count" not in text
    return text


@pytest.mark.parametrize("strip", [False, True])
def test_a_loop_body_counts_once_per_trip(strip):
    got = flops.loop_scaled_cost(_loop_program(strip))
    assert got["unresolved"] == [] and [lp["trips"] for lp in got["loops"]] == [7]
    w = jnp.ones((16, 16), jnp.float32)

    def unrolled(y):
        for _ in range(7):
            y = jnp.tanh(y @ w)
        return y

    compiled = jax.jit(unrolled).lower(jax.ShapeDtypeStruct((4, 16), jnp.float32)).compile()
    cost = compiled.cost_analysis()
    want = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    assert want >= 7 * 2 * 4 * 16 * 16 and got["once"]["flops"] < want / 2
    assert got["flops"] == pytest.approx(want, rel=0.01)


def _train_step_text(scan: bool, microbatches: int = 1, devices: int = 1, enc: int = 32, skip: str = "auto") -> tuple[str, float]:
    cfg = configs.model_config(
        "t5_1_1_tiny", dtype="float32", dropout_rate=0.0, remat_policy="full", scan_layers=scan, attention_q_block=64,
        attention_k_block=64, attention_skip=skip,
    )  # fmt: skip
    tx = optax.adamw(1e-3)
    mc = partitioning.MeshConfig(data=-1)
    mesh = partitioning.make_mesh(mc, jax.devices()[:devices])
    layout = trainer.state_layout(cfg, tx, mesh, mc.rules)
    bsh = partitioning.batch_sharding(mesh, mc.rules)
    step = trainer.jit_train_step(cfg, tx, losses.LossConfig(), microbatches, 0, layout, bsh, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), layout.abstract, layout.shardings)
    lengths = {"encoder_input_tokens": enc, "decoder_input_tokens": 8, "decoder_target_tokens": 8, "decoder_loss_weights": 8}
    rows = max(4, devices)
    batch = {k: jax.ShapeDtypeStruct((rows, n), jnp.int32, sharding=bsh) for k, n in {**lengths, "decoder_task_ids": 8}.items()}
    compiled = step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    return compiled.as_text(), float((cost[0] if isinstance(cost, list) else cost)["flops"])


@pytest.mark.slow
def test_scanned_layers_count_as_the_unrolled_program():
    unrolled_text, unrolled_xla = _train_step_text(scan=False)
    unrolled = flops.loop_scaled_cost(unrolled_text)
    assert unrolled["flops"] == pytest.approx(unrolled_xla, rel=1e-6)  # nothing loops there: XLA's count is exact
    scanned_text, scanned_xla = _train_step_text(scan=True)
    scanned = flops.loop_scaled_cost(scanned_text)
    assert scanned["unresolved"] == []
    assert scanned_xla < 0.8 * unrolled_xla  # XLA alone counts the scanned layer once
    # the same within 5%: the scanned program does a little work of its own (the layer loop's bookkeeping, the
    # relative-position bias per layer), while the loop counted once would be off by the layer count
    assert scanned["flops"] == pytest.approx(unrolled_xla, rel=0.05)


@pytest.mark.slow
def test_rows_split_over_devices_each_compute_only_their_own_attention():
    """Rows longer than an attention block, split over 8 devices: the step skips key blocks across the batch, so each
    device computes its own rows' attention; skipping row by row loops over the rows, which XLA cannot split, so
    every device gathers and computes all of them."""
    auto, _ = _train_step_text(scan=True, devices=8, enc=256)
    per_row, _ = _train_step_text(scan=True, devices=8, enc=256, skip="rows")
    assert flops.loop_scaled_cost(auto)["flops"] < 0.5 * flops.loop_scaled_cost(per_row)["flops"]
    one = partitioning.make_mesh(partitioning.MeshConfig(data=-1), jax.devices()[:1])
    cfg = configs.model_config("t5_1_1_tiny")
    assert partitioning.for_mesh(cfg, one) is cfg and cfg.attention_skip == "auto"  # one device: row by row


@pytest.mark.slow
def test_recipes_compute_fewer_tokens_for_the_same_model_flops():
    from conftest import SHARED_DATA

    from dss_jax import plan

    if not (SHARED_DATA / "cqa").exists():
        pytest.skip(f"no CQA data in {SHARED_DATA}")
    cfg = configs.model_config("t5_1_1_tiny")
    got = {}
    for recipe in ("padded", "bucketed", "packed"):
        arrays, enc, dec, shapes = plan.recipe_batch(recipe, 32, 1024, 256, 8, "cqa", None, 2)
        computed = batching.computed_tokens(arrays)
        got[recipe] = (flops.model_flops(cfg, enc, dec)["total"], computed, int(enc.sum() + dec.sum()))
        groups = batching.row_groups(arrays)  # bucketed: label rows and rationale rows, each at their own lengths
        assert len(groups) == (2 if recipe == "bucketed" else 1) and len(shapes) == 2 * len(groups)
        assert all(g["encoder_input_tokens"].shape[0] % 8 == 0 for g in groups)
    assert got["padded"][1] == 32 * (1024 + 256)
    assert got["padded"][0] == got["bucketed"][0] == got["packed"][0]  # the same examples: the same useful work
    # (per-task bucketing can match packing: here 3456 tokens each)
    assert got["packed"][2] <= got["packed"][1] <= got["bucketed"][1] < got["padded"][1]
    assert "decoder_segment_ids" in plan.recipe_batch("packed", 32, 1024, 256, 8, "cqa", None, 1)[0]
