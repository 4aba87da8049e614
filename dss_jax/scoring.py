"""The task's own metric on greedy-decoded labels, and the end-of-run report of each split.

Teacher-forced exact match (``trainer.eval_step``) equals greedy decoding's exact match, but not every task is
scored by exact match: SVAMP counts an equation right when its value is. Here the label task's rows are
decoded greedily and scored by the data source (``score``), so validation, model selection, the test split and
the final table use the task's metric. Decoding runs on this process's rows, so it needs one process; a
multi-process run keeps teacher-forced exact match and says so. No TensorFlow here.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

from dss_jax import decoding, partitioning
from dss_jax.model import T5Config

log = logging.getLogger("dss_jax.scoring")
TEACHER_FORCED = "exact_match_teacher_forced"


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)]) if x.shape[0] < rows else x


def decoded_scores(
    params: Any, cfg: T5Config, data: Any, split: str, batches: list[dict[str, np.ndarray]], local_batch: int, bsharding: Any
) -> dict[str, float]:
    """Greedy-decode the label task's ``batches`` of ``split`` and score them with the task's metric."""
    max_len = int(getattr(data, "targets_length", 64))
    texts: list[str] = []
    for b in batches:
        n = int(np.sum(b["decoder_loss_weights"].sum(1) > 0))
        enc = partitioning.global_batch({"x": _pad_rows(b["encoder_input_tokens"], local_batch)}, bsharding)["x"]
        tokens = decoding.decode(params, enc, cfg.replace(dropout_rate=0.0), max_len)
        texts += data.detokenize(np.asarray(jax.device_get(tokens))[:n])
    return {**data.score(split, texts), "examples": float(len(texts))}


def can_decode(data: Any) -> bool:
    return hasattr(data, "score") and jax.process_count() == 1


def use_task_metric(
    metrics: dict[str, float], params: Any, cfg: T5Config, data: Any, split: str, sets: dict, local_batch: int, bsharding: Any
) -> dict[str, float]:
    """Replaces the selection task's teacher-forced accuracy by the task metric where they differ (SVAMP)."""
    sel = data.selection_task
    if not getattr(data, "needs_decoding", False) or sel not in sets:
        return metrics
    if not can_decode(data):
        log.warning("%s: the task metric needs decoding on one process; reporting teacher-forced exact match", sel)
        return metrics
    out = dict(metrics)
    if f"{sel}/accuracy" in out:
        out[f"{sel}/{TEACHER_FORCED}"] = out.pop(f"{sel}/accuracy")
    scores = decoded_scores(params, cfg, data, split, sets[sel], local_batch, bsharding)
    out[f"{sel}/accuracy"] = scores["accuracy"]
    return out


def split_report(
    params: Any,
    cfg: T5Config,
    data: Any,
    split: str,
    sets: dict,
    teacher_forced: dict[str, float],
    local_batch: int,
    bsharding: Any,
) -> dict[str, Any]:
    """One row of the final table: examples scored / total, the task metric, losses, listed-choice share."""
    sel = data.selection_task
    total = data.split_size(split) if hasattr(data, "split_size") else None
    row: dict[str, Any] = {"total": total}
    for k, v in teacher_forced.items():
        task, _, name = k.partition("/")
        if name in ("label_loss", "rationale_loss"):
            row[name] = v
        if task == sel and name in ("accuracy", "examples"):
            row["teacher_forced_accuracy" if name == "accuracy" else "examples"] = v
    if can_decode(data) and sel in sets:
        scores = decoded_scores(params, cfg, data, split, sets[sel], local_batch, bsharding)
        row.update(scores)
    else:
        row["accuracy"] = row.get("teacher_forced_accuracy")
    row["subset"] = total is not None and row.get("examples") is not None and int(row["examples"]) < total
    return row
