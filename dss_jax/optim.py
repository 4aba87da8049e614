"""Optimizers and learning-rate schedules (optax), configured from gin.

AdamW with linear decay to 0 and no warmup is the paper's recipe; Adafactor is T5X's default.
"""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "linear", "cosine", "rsqrt")


@gin.configurable
def learning_rate_schedule(
    base_learning_rate: float = 5e-5,
    decay: str = "linear",
    warmup_steps: int = 0,
    total_steps: int = gin.REQUIRED,
    end_value: float = 0.0,
) -> optax.Schedule:
    """Warmup (linear from 0) then constant / linear / cosine decay to ``end_value`` at ``total_steps``, or
    T5's rsqrt decay (base_learning_rate / sqrt(max(step, warmup_steps)) scaled to meet the warmup's peak)."""
    if decay not in SCHEDULES:
        raise ValueError(f"learning_rate_schedule.decay={decay!r}; expected one of {SCHEDULES}")
    if total_steps <= 0 or warmup_steps < 0 or warmup_steps > total_steps:
        raise ValueError(f"learning_rate_schedule: need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps})")
    decay_steps = max(1, total_steps - warmup_steps)
    main: optax.Schedule
    if decay == "constant":
        main = optax.constant_schedule(base_learning_rate)
    elif decay == "linear":
        main = optax.linear_schedule(base_learning_rate, end_value, decay_steps)
    elif decay == "cosine":
        main = optax.cosine_decay_schedule(base_learning_rate, decay_steps, alpha=end_value / max(base_learning_rate, 1e-30))
    else:
        offset = max(1, warmup_steps)

        def rsqrt(step: jax.typing.ArrayLike) -> jax.Array:
            return base_learning_rate * jnp.sqrt(offset) / jnp.sqrt(jnp.maximum(step + offset, offset))

        main = rsqrt

    if warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, base_learning_rate, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


@gin.configurable
def make_optimizer(
    name: str = "adamw",
    learning_rate: optax.Schedule | float = gin.REQUIRED,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip_norm: float | None = 1.0,
    adafactor_decay_rate: float = 0.8,
) -> optax.GradientTransformation:
    """AdamW (the paper: lr 5e-5, no weight decay, clip 1.0) or Adafactor (T5X's factored second moments)."""
    if name == "adamw":
        opt = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    elif name == "adafactor":
        opt = optax.adafactor(
            learning_rate,
            decay_rate=adafactor_decay_rate,
            multiply_by_parameter_scale=True,
            clipping_threshold=1.0,
            weight_decay_rate=weight_decay or None,
        )
    else:
        raise ValueError(f"make_optimizer.name={name!r}; expected 'adamw' or 'adafactor'")
    if grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(grad_clip_norm), opt)
    return opt
