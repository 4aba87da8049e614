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
from dss_jax.model import ModelConfig

log = logging.getLogger("dss_jax.scoring")
TEACHER_FORCED = "exact_match_teacher_forced"


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)]) if x.shape[0] < rows else x


def decoded_scores(
    params: Any, cfg: ModelConfig, data: Any, split: str, batches: list[dict[str, np.ndarray]], local_batch: int, bsharding: Any
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


def rank_classify(
    params: Any, cfg: ModelConfig, inputs: np.ndarray, choices: list[list[list[int]]], batch_size: int = 32, sharding: Any = None
) -> np.ndarray:
    """Index of the most likely candidate per input row: ``inputs`` [n, length] encoder tokens, ``choices[i]`` the
    token lists (each through EOS) of row i's candidates. Ties go to the first listed. Runs in batches of
    ``batch_size`` rows padded to the longest candidate, so a few shapes compile; ``sharding`` places each batch
    on the mesh the parameters live on."""
    cfg = cfg.replace(dropout_rate=0.0)
    n_choices = max(len(c) for c in choices)
    length = max(len(t) for c in choices for t in c)
    length = -(-length // 8) * 8
    picks = []
    for start in range(0, len(inputs), batch_size):
        rows = inputs[start : start + batch_size]
        cand = np.zeros((batch_size, n_choices, length), np.int32)
        for i, cs in enumerate(choices[start : start + batch_size]):
            for j, toks in enumerate(cs):
                cand[i, j, : len(toks)] = toks
        enc = _pad_rows(np.asarray(rows, np.int32), batch_size)
        if sharding is not None:
            enc, cand = (partitioning.global_batch({"x": x}, sharding)["x"] for x in (enc, cand))
        scores = decoding.choice_log_probs(params, enc, cand, cfg)
        picks.append(np.argmax(np.asarray(jax.device_get(scores))[: len(rows)], axis=1))
    return np.concatenate(picks) if picks else np.zeros((0,), np.int64)


def rank_scores(
    params: Any, cfg: ModelConfig, data: Any, split: str, batches: list[dict[str, np.ndarray]], local_batch: int, bsharding: Any
) -> dict[str, float]:
    """Rank-classification accuracy of the label task's ``batches`` of ``split`` (empty when the task has no
    closed label set)."""
    inputs = [b["encoder_input_tokens"][: int(np.sum(b["decoder_loss_weights"].sum(1) > 0))] for b in batches]
    inputs = np.concatenate(inputs) if inputs else np.zeros((0, 1), np.int32)
    labels = data.candidate_labels(split, len(inputs))
    if labels is None or not len(inputs):
        return {}
    picks = rank_classify(params, cfg, inputs, [data.tokenize(c) for c in labels], local_batch, bsharding)
    return data.score(split, [c[k] for c, k in zip(labels, picks, strict=True)])


def can_decode(data: Any) -> bool:
    return hasattr(data, "score") and jax.process_count() == 1


def use_task_metric(
    metrics: dict[str, float], params: Any, cfg: ModelConfig, data: Any, split: str, sets: dict, local_batch: int, bsharding: Any
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


def metrics_with_row(metrics: dict[str, float], data: Any, row: dict[str, Any]) -> dict[str, float]:
    """``use_task_metric`` from a ``split_report`` row, without decoding the split again: the selection task's
    teacher-forced accuracy is replaced by the row's decoded metric where they differ (SVAMP); rank accuracy added."""
    sel = data.selection_task
    out = dict(metrics)
    if getattr(data, "needs_decoding", False) and can_decode(data) and f"{sel}/accuracy" in out:
        out[f"{sel}/{TEACHER_FORCED}"] = out.pop(f"{sel}/accuracy")
        out[f"{sel}/accuracy"] = row["accuracy"]
    if "rank_accuracy" in row:
        out[f"{sel}/rank_accuracy"] = row["rank_accuracy"]
    return out


def with_rank_accuracy(
    metrics: dict[str, float], params: Any, cfg: ModelConfig, data: Any, split: str, sets: dict, local_batch: int, bsharding: Any
) -> dict[str, float]:
    """Adds ``<task>/rank_accuracy`` when the data asks for rank classification (``rank_classification``)."""
    sel = data.selection_task
    if not getattr(data, "rank_classification", False) or sel not in sets or jax.process_count() > 1:
        return metrics
    scores = rank_scores(params, cfg, data, split, sets[sel], local_batch, bsharding)
    return {**metrics, f"{sel}/rank_accuracy": scores["accuracy"]} if scores else metrics


def split_report(
    params: Any,
    cfg: ModelConfig,
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
        if getattr(data, "rank_classification", False):
            rank = rank_scores(params, cfg, data, split, sets[sel], local_batch, bsharding)
            if rank:
                row["rank_accuracy"] = rank["accuracy"]
    else:
        row["accuracy"] = row.get("teacher_forced_accuracy")
    row["subset"] = total is not None and row.get("examples") is not None and int(row["examples"]) < total
    return row
