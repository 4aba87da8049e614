"""Synthetic DSS batches for trainer tests (label rows and rationale rows, padded)."""

import numpy as np


def toy_batch(rows: int, inputs_length: int, targets_length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, vocab, size=(rows, inputs_length)).astype(np.int32)
    tgt = rng.integers(2, vocab, size=(rows, targets_length)).astype(np.int32)
    for r in range(rows):
        enc[r, rng.integers(3, inputs_length) :] = 0
        tgt[r, rng.integers(1, targets_length) :] = 0
    dec_in = np.concatenate([np.zeros((rows, 1), np.int32), tgt[:, :-1]], axis=1)
    w = (tgt != 0).astype(np.int32)
    tids = (w * np.where(np.arange(rows)[:, None] % 2 == 0, 1, 2)).astype(np.int32)
    return {
        "encoder_input_tokens": enc,
        "decoder_input_tokens": dec_in,
        "decoder_target_tokens": tgt,
        "decoder_loss_weights": w,
        "decoder_task_ids": tids,
    }
