"""Token losses and the paper's per-task weighting.

``loss = a * mean(label-token loss) + (1 - a) * mean(rationale-token loss)``, each mean over that task's
target tokens in the (global) batch, as the paper's code averages each task's loss; or, for T5X-style
mixtures, one mean over all target tokens.
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp

LOSS_MODES = ("task_weighted", "token_mean")
# The task id each target token carries (``decoder_task_ids``); 0 is padding. The data layer writes them
# (tasks/registry.py), the losses and metrics read them; defined here, where no TensorFlow is needed.
LABEL_TASK_ID, RATIONALE_TASK_ID = 1, 2


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LossConfig:
    mode: str = "task_weighted"
    alpha: float = 0.5  # weight of the label task (the paper's a)
    label_smoothing: float = 0.0
    z_loss: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in LOSS_MODES:
            raise ValueError(f"LossConfig.mode={self.mode!r}; expected one of {LOSS_MODES}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"LossConfig.alpha must be in [0, 1], got {self.alpha}")


def token_losses(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0, z_loss: float = 0.0) -> jax.Array:
    """Per-token cross entropy [batch, length] in float32, with optional label smoothing and z-loss.

    Written without a one-hot of the targets: at T5's 32k vocabulary a [batch, length, vocab] one-hot
    costs as much memory as the logits themselves.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    loss = log_z - target_logit
    if label_smoothing > 0:
        # target distribution: confidence on the target, `low` on every other class
        confidence = 1.0 - label_smoothing
        low = label_smoothing / max(vocab - 1, 1)
        sum_log_p = jnp.sum(logits, axis=-1) - vocab * log_z
        loss = (confidence - low) * loss - low * sum_log_p
        # minus the smoothed target's entropy, so that a perfect model scores 0
        loss = loss + confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20)
    if z_loss > 0:
        loss = loss + z_loss * jnp.square(log_z)
    return loss


def task_token_counts(weights: jax.Array, task_ids: jax.Array) -> dict[str, jax.Array]:
    w = weights.astype(jnp.float32)
    return {
        "all": jnp.sum(w),
        "label": jnp.sum(w * (task_ids == LABEL_TASK_ID)),
        "rationale": jnp.sum(w * (task_ids == RATIONALE_TASK_ID)),
    }


def weighted_loss(
    losses: jax.Array, weights: jax.Array, task_ids: jax.Array, counts: dict[str, jax.Array], cfg: LossConfig
) -> jax.Array:
    """The scalar objective; ``counts`` are the token counts of the whole (global) batch, so that summing this
    over microbatches gives the full-batch value."""
    w = weights.astype(jnp.float32)
    if cfg.mode == "token_mean":
        return jnp.sum(losses * w) / jnp.maximum(counts["all"], 1.0)
    label = jnp.sum(losses * w * (task_ids == LABEL_TASK_ID)) / jnp.maximum(counts["label"], 1.0)
    rationale = jnp.sum(losses * w * (task_ids == RATIONALE_TASK_ID)) / jnp.maximum(counts["rationale"], 1.0)
    # A batch without rationale tokens (baselines) is plain label training; without label tokens, the reverse.
    has_l, has_r = counts["label"] > 0, counts["rationale"] > 0
    a = jnp.where(has_l & has_r, cfg.alpha, jnp.where(has_l, 1.0, 0.0))
    return a * label + (1.0 - a) * rationale
