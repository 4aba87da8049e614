"""Train state, the jitted train and eval steps, and their shardings on a mesh.

Pure functions of explicit state: ``TrainState`` holds step, params and optimizer state; the dropout rng of
step ``s`` is ``fold_in(seed_key, s)``, so a resumed run draws the same randomness as an uninterrupted one.
No TensorFlow or seqio here: batches are dicts of numpy arrays (see ``dss_jax.tasks.pipeline``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, cast

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding

from dss_jax import batching, losses, partitioning
from dss_jax.losses import LABEL_TASK_ID as LABEL
from dss_jax.losses import RATIONALE_TASK_ID as RATIONALE
from dss_jax.model import ModelConfig, build
from dss_jax.params import abstract_boxed_params

# What draws the dropout masks (``jax.random.key``'s impl). threefry2x32, JAX's default: the same masks on any mesh
# and backend, from integer arithmetic. rbg: the bits from XLA's RngBitGenerator (the TPU's hardware generator),
# keys still derived by threefry; the masks repeat for a given mesh. unsafe_rbg derives keys with the generator too.
# docs/training.md has what rbg saves and costs on TPU.
RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """The training state; the same tree also holds its abstract shapes and its shardings (``StateLayout``)."""

    step: Any
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Abstract state (shapes/dtypes) and its shardings on the mesh."""

    abstract: TrainState
    shardings: TrainState
    boxed_params: Any


def state_layout(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, rules: Any) -> StateLayout:
    boxed = abstract_boxed_params(cfg)
    abstract_params = nn.meta.unbox(boxed)
    p_shard = partitioning.params_shardings(boxed, mesh, rules)
    o_shard = partitioning.opt_state_shardings(tx, abstract_params, p_shard, mesh)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=abstract_params,
        opt_state=jax.eval_shape(tx.init, abstract_params),
    )
    shardings = TrainState(step=partitioning.replicated(mesh), params=p_shard, opt_state=o_shard)
    return StateLayout(abstract, shardings, boxed)


def init_state(
    cfg: ModelConfig, tx: optax.GradientTransformation, layout: StateLayout, seed: int, params: Any = None
) -> TrainState:
    """A fresh state born sharded: random params from ``seed``, or the given (pretrained) params."""
    model = build(cfg)

    if params is None:

        def init(rng: jax.Array) -> TrainState:
            dummy = jnp.ones((1, 8), jnp.int32)
            p = nn.meta.unbox(model.init(rng, dummy, dummy)["params"])
            return TrainState(jnp.array(0, jnp.int32), p, tx.init(p))

        return jax.jit(init, out_shardings=layout.shardings)(jax.random.PRNGKey(seed))

    params = jax.tree.map(
        lambda x, a, s: jax.device_put(np.asarray(x, a.dtype), s), params, layout.abstract.params, layout.shardings.params
    )
    opt_state = jax.jit(tx.init, out_shardings=layout.shardings.opt_state)(params)
    return TrainState(jax.device_put(jnp.array(0, jnp.int32), layout.shardings.step), params, opt_state)


def with_start_tokens(tokens: jax.Array, segment_ids: jax.Array | None, start_id: int) -> jax.Array:
    """Decoder inputs whose segments begin with ``start_id``: seqio's feature converter starts each target
    segment with 0 (T5's start token); T5Gemma's decoder starts with bos. A no-op when ``start_id`` is 0."""
    if start_id == 0:
        return tokens
    if segment_ids is None:
        first = jnp.arange(tokens.shape[1]) == 0
        return jnp.where(first[None, :], start_id, tokens)
    prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))
    return jnp.where((segment_ids > 0) & (segment_ids != prev), start_id, tokens)


def _forward(model: nn.Module, params: Any, batch: Batch, deterministic: bool, rng: jax.Array | None) -> jax.Array:
    dec_seg = batch.get("decoder_segment_ids")
    rngs = None
    if not deterministic:
        assert rng is not None, "a training step with dropout needs an rng"
        rngs = {"dropout": rng}
    return cast(
        jax.Array,
        model.apply(
            {"params": params},
            batch["encoder_input_tokens"],
            with_start_tokens(batch["decoder_input_tokens"], dec_seg, model.config.decoder_start_token_id),
            batch.get("encoder_segment_ids"),
            dec_seg,
            deterministic=deterministic,
            rngs=rngs,
        ),
    )


def _task_sums(tl: jax.Array, w: jax.Array, tids: jax.Array) -> dict[str, jax.Array]:
    return {
        "label_loss_sum": jnp.sum(tl * w * (tids == LABEL)),
        "rationale_loss_sum": jnp.sum(tl * w * (tids == RATIONALE)),
    }


def _sequence_counts(batch: Batch) -> dict[str, jax.Array]:
    """Label and rationale sequences in a batch (packed rows hold several): for examples/s."""
    tids = batch["decoder_task_ids"]
    seg = batch.get("decoder_segment_ids", (batch["decoder_loss_weights"] > 0).astype(jnp.int32))
    prev = jnp.pad(seg[:, :-1], ((0, 0), (1, 0)))
    start = (seg > 0) & (seg != prev)
    return {
        "label_sequences": jnp.sum(start & (tids == LABEL)).astype(jnp.float32),
        "rationale_sequences": jnp.sum(start & (tids == RATIONALE)).astype(jnp.float32),
    }


def _token_counts(batch: Batch) -> dict[str, jax.Array]:
    return {
        "target_tokens": jnp.sum(batch["decoder_loss_weights"] > 0).astype(jnp.float32),  # whatever their weight
        "nonpad_input_tokens": jnp.sum(batch["encoder_input_tokens"] != 0).astype(jnp.float32),
        **_sequence_counts(batch),
    }


def _sum_dicts(ds: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
    return {k: functools.reduce(jnp.add, [d[k] for d in ds]) for k in ds[0]}


def _groups_loss(
    model: nn.Module,
    loss_cfg: losses.LossConfig,
    counts: dict[str, jax.Array],
    params: Any,
    groups: list[Batch],
    rng: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The step's objective over its row groups (``batching.row_groups``), and its per-task loss sums.

    ``counts`` are the whole batch's token counts, so the groups' (and microbatches') losses add up to the
    batch's. Each group is one forward pass at its own shape (bucketed steps: label and rationale rows).
    """
    total, sums = [], []
    for i, g in enumerate(groups):
        logits = _forward(model, params, g, False, rng if i == 0 else jax.random.fold_in(rng, i))
        tl = losses.token_losses(logits, g["decoder_target_tokens"], loss_cfg.label_smoothing, loss_cfg.z_loss)
        w = g["decoder_loss_weights"].astype(jnp.float32)
        total.append(losses.weighted_loss(tl, w, g["decoder_task_ids"], counts, loss_cfg))
        if loss_cfg.label_smoothing or loss_cfg.z_loss:
            tl = losses.token_losses(logits, g["decoder_target_tokens"])
        sums.append(_task_sums(tl, w, g["decoder_task_ids"]))
    return functools.reduce(jnp.add, total), _sum_dicts(sums)


def _strided_split(x: jax.Array, k: int, sharding: NamedSharding | None) -> jax.Array:
    """[B, ...] -> [k, B/k, ...] with slice i = rows i, i + k, ...: a device's rows stay on that device."""
    y = jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
    if sharding is None:
        return y
    spec = jax.sharding.PartitionSpec(None, *sharding.spec)
    return jax.lax.with_sharding_constraint(y, NamedSharding(sharding.mesh, spec))


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    loss_cfg: losses.LossConfig,
    microbatches: int,
    seed_key: jax.Array,
    batch_sharding: NamedSharding | None = None,
    skip_nonfinite: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step (gradients accumulated over ``microbatches`` slices of the batch).

    Microbatch i is rows i, i + k, i + 2k, ... of the batch: every device's contiguous shard holds rows of
    every microbatch, so each microbatch runs on all devices with 1/k of their rows (no gather of the batch).
    ``batch_sharding`` pins each slice to the batch's sharding. A bucketed batch holds several groups of rows, each
    of its own shape (``batching.row_groups``): one forward pass per group, one loss over all.

    ``metrics["nonfinite"]`` flags a step whose loss, gradient norm or updated parameters are not finite (see
    ``nonfinite_flags``), so the loop can stop before such a state is saved; with ``skip_nonfinite`` that update
    is not applied (parameters and optimizer state stay as they were) and the step counts as skipped.
    """
    model = build(cfg)
    rng = jax.random.fold_in(seed_key, state.step)
    groups = batching.row_groups(batch)
    counts = _sum_dicts([losses.task_token_counts(g["decoder_loss_weights"], g["decoder_task_ids"]) for g in groups])
    loss_fn = functools.partial(_groups_loss, model, loss_cfg, counts)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
        (loss, aux), grads = grad_fn(state.params, groups, rng)
    else:
        mbs = jax.tree.map(functools.partial(_strided_split, k=microbatches, sharding=batch_sharding), groups)

        def body(carry: tuple, xs: tuple) -> tuple:
            g_acc, l_acc, a_acc = carry
            mb, i = xs
            if batch_sharding is not None:
                mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding), mb)
            (mb_loss, a), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
            return (jax.tree.map(jnp.add, g_acc, g), l_acc + mb_loss, jax.tree.map(jnp.add, a_acc, a)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        aux0 = {"label_loss_sum": jnp.zeros(()), "rationale_loss_sum": jnp.zeros(())}
        (grads, loss, aux), _ = jax.lax.scan(body, (zeros, jnp.zeros(()), aux0), (mbs, jnp.arange(microbatches)))

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    flags = nonfinite_flags(loss, grad_norm, params)
    if skip_nonfinite:
        bad = flags > 0
        params = jax.tree.map(lambda new, old: jnp.where(bad, old, new), params, state.params)
        opt_state = jax.tree.map(lambda new, old: jnp.where(bad, old, new), opt_state, state.opt_state)
    metrics = {
        "loss": loss,
        "label_loss": aux["label_loss_sum"] / jnp.maximum(counts["label"], 1.0),
        "rationale_loss": aux["rationale_loss_sum"] / jnp.maximum(counts["rationale"], 1.0),
        "grad_norm": grad_norm,
        "nonfinite": flags,
        **_sum_dicts([_token_counts(g) for g in groups]),
    }
    return TrainState(state.step + 1, params, opt_state), metrics


NONFINITE_PARTS = ((1, "the loss"), (2, "the gradient norm"), (4, "the parameters after the update"))


def nonfinite_flags(loss: jax.Array, grad_norm: jax.Array, params: Any) -> jax.Array:
    """int32 bit flags, 0 for a sound step: 1 loss, 2 gradient norm, 4 updated parameters not finite.

    The parameters are checked as well as the gradient: a finite gradient times a huge learning rate can still
    overflow them, and the loss is computed before the update, so it alone would pass a ruined state.
    """
    params_ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    return (
        (~jnp.isfinite(loss)).astype(jnp.int32)
        | ((~jnp.isfinite(grad_norm)).astype(jnp.int32) << 1)
        | ((~params_ok).astype(jnp.int32) << 2)
    )


@jax.jit
def track_nonfinite(acc: jax.Array, flags: jax.Array, step: jax.Array) -> jax.Array:
    """``acc`` = [first flagged step (0: none), its flags, flagged steps so far]; stays on device, so the loop
    learns where divergence started without waiting for the device every step."""
    hit = flags > 0
    first = (acc[0] == 0) & hit
    return jnp.stack([jnp.where(first, step, acc[0]), jnp.where(first, flags, acc[1]), acc[2] + hit.astype(jnp.int32)])


def describe_nonfinite(flags: int) -> str:
    parts = [name for bit, name in NONFINITE_PARTS if flags & bit]
    return (" and ".join(parts) or "nothing") + (" is" if len(parts) == 1 else " are") + " not finite"


def eval_step(params: Any, batch: Batch, *, cfg: ModelConfig) -> dict[str, jax.Array]:
    """Sums for validation: per-task token losses and teacher-forced exact match of each (unpacked) row.

    Greedy decoding reproduces a target iff every teacher-forced argmax matches it through EOS, so the
    exact-match count equals what greedy decoding would score, at the cost of one forward pass.
    """
    logits = _forward(build(cfg), params, batch, True, None)
    targets = batch["decoder_target_tokens"]
    w = batch["decoder_loss_weights"].astype(jnp.float32)
    tids = batch["decoder_task_ids"]
    tl = losses.token_losses(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets) | (w == 0)
    row_valid = jnp.sum(w, axis=1) > 0
    row_em = jnp.all(correct, axis=1) & row_valid
    row_label = row_valid & (tids[:, 0] == LABEL)
    return {
        **_task_sums(tl, w, tids),
        "label_tokens": jnp.sum(w * (tids == LABEL)),
        "rationale_tokens": jnp.sum(w * (tids == RATIONALE)),
        "label_exact": jnp.sum(row_em & row_label).astype(jnp.float32),
        "label_rows": jnp.sum(row_label).astype(jnp.float32),
    }


def summarize_eval(sums: dict[str, float]) -> dict[str, float]:
    out = {}
    if sums.get("label_tokens", 0) > 0:
        out["label_loss"] = sums["label_loss_sum"] / sums["label_tokens"]
    if sums.get("rationale_tokens", 0) > 0:
        out["rationale_loss"] = sums["rationale_loss_sum"] / sums["rationale_tokens"]
    if sums.get("label_rows", 0) > 0:
        out["accuracy"] = 100.0 * sums["label_exact"] / sums["label_rows"]
        out["examples"] = sums["label_rows"]
    return out


def jit_train_step(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    loss_cfg: losses.LossConfig,
    microbatches: int,
    seed: int,
    layout: StateLayout,
    batch_sharding: NamedSharding,
    mesh: Mesh,
    skip_nonfinite: bool = False,
    rng_impl: str = "threefry2x32",
) -> jax.stages.Wrapped:
    """The jitted ``train_step``, its dropout masks drawn by ``rng_impl`` (one of ``RNG_IMPLS``)."""
    fn = functools.partial(
        train_step,
        cfg=partitioning.for_mesh(cfg, mesh),
        tx=tx,
        loss_cfg=loss_cfg,
        microbatches=microbatches,
        seed_key=jax.random.key(seed, impl=rng_impl),
        batch_sharding=batch_sharding,
        skip_nonfinite=skip_nonfinite,
    )
    return jax.jit(
        fn,
        in_shardings=(layout.shardings, batch_sharding),
        out_shardings=(layout.shardings, partitioning.replicated(mesh)),
        donate_argnums=(0,),
    )


def jit_eval_step(cfg: ModelConfig, layout: StateLayout, batch_sharding: NamedSharding, mesh: Mesh) -> Callable:
    return jax.jit(
        functools.partial(eval_step, cfg=partitioning.for_mesh(cfg, mesh)),
        in_shardings=(layout.shardings.params, batch_sharding),
        out_shardings=partitioning.replicated(mesh),
    )


def train_flops_per_token(cfg: ModelConfig, inputs_length: int, targets_length: int) -> float:
    """Approximate training FLOPs per target token (6 x matmul params, plus attention), for MFU reports."""
    return cfg.train_flops_per_token(inputs_length, targets_length)
