"""Shared pieces of the benchmarks: model presets, synthetic batches, device peak FLOP/s."""

from __future__ import annotations

import jax
import numpy as np

from dss_jax.losses import LABEL_TASK_ID, RATIONALE_TASK_ID

# Dense bf16 peak FLOP/s per chip, for MFU. Unknown devices (CPUs) report no MFU.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops(device: jax.Device) -> float | None:
    kind = device.device_kind
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops
    return None


def synthetic_batch(
    batch: int, inputs_length: int, targets_length: int, vocab: int, fill: float, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random tokens; each row's first ``fill`` fraction is real, the rest padding; half the rows are rationale rows."""
    rng = np.random.RandomState(seed)
    enc = rng.randint(2, vocab, size=(batch, inputs_length)).astype(np.int32)
    tgt = rng.randint(2, vocab, size=(batch, targets_length)).astype(np.int32)
    enc[:, max(1, int(fill * inputs_length)) :] = 0
    tgt[:, max(1, int(fill * targets_length)) :] = 0
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
    w = (tgt != 0).astype(np.int32)
    tids = (w * np.where(np.arange(batch)[:, None] % 2 == 0, LABEL_TASK_ID, RATIONALE_TASK_ID)).astype(np.int32)
    return {
        "encoder_input_tokens": enc,
        "decoder_input_tokens": dec_in,
        "decoder_target_tokens": tgt,
        "decoder_loss_weights": w,
        "decoder_task_ids": tids,
    }
