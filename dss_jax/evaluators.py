"""Evaluators, as big_vision has them: each is built once for an evaluation split, and ``run(params)`` yields
``(name, value)`` metrics. The train loop runs a split's evaluators at every evaluation and once per split at
the end of the run; dss-eval runs the decoded and rank evaluators on a checkpoint.

- :class:`TeacherForced`: per-task token losses and the label rows' teacher-forced exact match (one forward pass).
- :class:`Decoded`: the selection task's label rows decoded and scored by the task's own metric. Teacher-forced
  exact match equals greedy decoding's exact match, but not every task is scored by exact match: SVAMP counts
  an equation right when its value is, so validation, model selection and the test split decode there.
- :class:`RankClassification`: each row's candidate labels ranked by their likelihood (closed label sets).

Decoding and ranking run on this process's rows, so they need one process; a multi-process run keeps
teacher-forced exact match and says so. No TensorFlow here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import numpy as np

from dss_jax import decoding, partitioning, trainer
from dss_jax.data_source import Batch, DataSource
from dss_jax.model import ModelConfig

log = logging.getLogger("dss_jax.evaluators")
TEACHER_FORCED = "exact_match_teacher_forced"


class Evaluator(Protocol):
    def run(self, params: Any) -> Iterator[tuple[str, float]]: ...


def _pad_leading(x: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)]) if x.shape[0] < rows else x


@dataclasses.dataclass(frozen=True)
class Placement:
    """How this process's rows reach the devices: padded to ``local_batch`` rows and placed with ``sharding``, the
    batch sharding of the mesh the parameters live on (None: left on the host for jit to place)."""

    local_batch: int
    sharding: Any = None

    def put(self, x: np.ndarray) -> Any:
        x = _pad_leading(x, self.local_batch)
        return x if self.sharding is None else partitioning.global_batch({"x": x}, self.sharding)["x"]

    def put_batch(self, batch: Batch) -> Any:
        padded = {k: _pad_leading(v, self.local_batch) for k, v in batch.items()}
        return padded if self.sharding is None else partitioning.global_batch(padded, self.sharding)


def _equalize(sets: dict[str, list[Batch]]) -> dict[str, list[Batch]]:
    """Every process must run the same number of eval steps: pad shorter lists with empty batches."""
    if jax.process_count() == 1:
        return sets
    from jax.experimental import multihost_utils

    out: dict[str, list[Any]] = {}  # a process without rows of a set pads it with None (no batch to copy)
    for name, batches in sorted(sets.items()):
        n = int(np.max(multihost_utils.process_allgather(np.array(len(batches)))))
        empty = {k: np.zeros_like(v) for k, v in batches[0].items()} if batches else None
        out[name] = batches + [empty] * (n - len(batches))
    return out


def eval_sets(data: DataSource, split: str, local_batch: int, max_examples: int | None = -1) -> dict[str, list[Batch]]:
    """This process's eval batches of ``split`` per eval task, the same number of batches on every process."""
    return _equalize(data.eval_sets(split, local_batch, jax.process_index(), jax.process_count(), max_examples))


def label_rows(batches: list[Batch]) -> list[np.ndarray]:
    """The encoder inputs of the rows that hold a label in eval ``batches`` (padding rows dropped), in order."""
    rows: list[np.ndarray] = []
    for b in batches:
        rows += list(b["encoder_input_tokens"][: int(np.sum(b["decoder_loss_weights"].sum(1) > 0))])
    return rows


@dataclasses.dataclass(frozen=True)
class TeacherForced:
    """Per-task token losses and the label rows' teacher-forced exact match (``accuracy``) over every eval set,
    named ``<task>/<metric>`` (``eval_fn``: ``trainer.jit_eval_step``)."""

    eval_fn: Callable
    sets: dict[str, list[Batch]]
    placement: Placement

    def run(self, params: Any) -> Iterator[tuple[str, float]]:
        for name, batches in self.sets.items():
            sums: dict[str, float] = {}
            for b in batches:
                m = jax.device_get(self.eval_fn(params, self.placement.put_batch(b)))
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            for k, v in trainer.summarize_eval(sums).items():
                yield f"{name}/{k}", v


@dataclasses.dataclass(frozen=True)
class Decoded:
    """The selection task's label ``rows`` of ``split`` decoded (greedily, or the best of ``num_beams``) and
    scored by the task's own metric (``data.score``): yields its metrics and ``examples``."""

    data: DataSource
    split: str
    rows: list[np.ndarray]
    cfg: ModelConfig
    batch_size: int
    max_decode_length: int
    num_beams: int = 1
    place: Callable[[np.ndarray], Any] | None = None

    def predict(self, params: Any) -> list[str]:
        """The decoded label text of each row."""
        ids = decoding.decode_and_cut(
            params,
            self.rows,
            self.cfg.replace(dropout_rate=0.0),
            length=self.data.inputs_length,
            batch_size=self.batch_size,
            max_decode_length=self.max_decode_length,
            num_beams=self.num_beams,
            place=self.place,
        )
        return self.data.detokenize(ids)

    def score(self, predictions: list[str]) -> dict[str, float]:
        return {**self.data.score(self.split, predictions), "examples": float(len(predictions))}

    def run(self, params: Any) -> Iterator[tuple[str, float]]:
        yield from self.score(self.predict(params)).items()


def rank_classify(
    params: Any, cfg: ModelConfig, inputs: np.ndarray, choices: list[list[list[int]]], batch_size: int = 32, sharding: Any = None
) -> np.ndarray:
    """Index of the most likely candidate per input row: ``inputs`` [n, length] encoder tokens, ``choices[i]`` the
    token lists (each through EOS) of row i's candidates. Ties go to the first listed. Runs in batches of
    ``batch_size`` rows padded to the longest candidate, so a few shapes compile; ``sharding`` places each batch
    on the mesh the parameters live on."""
    cfg = cfg.replace(dropout_rate=0.0)
    place = Placement(batch_size, sharding)
    n_choices = max(len(c) for c in choices)
    length = -(-max(len(t) for c in choices for t in c) // 8) * 8
    picks = []
    for start in range(0, len(inputs), batch_size):
        rows = inputs[start : start + batch_size]
        cand = np.zeros((batch_size, n_choices, length), np.int32)
        for i, cs in enumerate(choices[start : start + batch_size]):
            for j, toks in enumerate(cs):
                cand[i, j, : len(toks)] = toks
        scores = decoding.choice_log_probs(params, place.put(np.asarray(rows, np.int32)), place.put(cand), cfg)
        picks.append(np.argmax(np.asarray(jax.device_get(scores))[: len(rows)], axis=1))
    return np.concatenate(picks) if picks else np.zeros((0,), np.int64)


@dataclasses.dataclass(frozen=True)
class RankClassification:
    """Each label row's candidate labels (``data.candidate_labels``) ranked by their likelihood, as seqio's rank
    classification does: yields ``rank_accuracy``, or nothing for a task without a closed label set."""

    data: DataSource
    split: str
    rows: list[np.ndarray]
    cfg: ModelConfig
    batch_size: int
    sharding: Any = None

    def predict(self, params: Any) -> list[str] | None:
        """Each row's most likely candidate label; None when the task has no closed label set."""
        labels = self.data.candidate_labels(self.split, len(self.rows))
        if labels is None or not self.rows:
            return None if labels is None else []
        inputs = decoding.pad_rows(self.rows, len(self.rows), self.data.inputs_length)
        picks = rank_classify(params, self.cfg, inputs, [self.data.tokenize(c) for c in labels], self.batch_size, self.sharding)
        return [c[k] for c, k in zip(labels, picks, strict=True)]

    def run(self, params: Any) -> Iterator[tuple[str, float]]:
        ranked = self.predict(params)
        if ranked:
            yield "rank_accuracy", self.data.score(self.split, ranked)["accuracy"]


@dataclasses.dataclass(frozen=True)
class SplitEvaluators:
    """One split's evaluators, built once by :func:`build`: teacher-forced over every eval set and, on the
    selection task's label rows, the decoded task metric and rank classification where they apply."""

    data: DataSource
    split: str
    teacher_forced: TeacherForced
    decoded: Decoded | None = None
    rank: RankClassification | None = None

    @property
    def evaluators(self) -> dict[str, Evaluator]:
        evs = {"teacher_forced": self.teacher_forced, "decoded": self.decoded, "rank": self.rank}
        return {k: v for k, v in evs.items() if v is not None}

    def results(self, params: Any) -> dict[str, dict[str, float]]:
        """Each evaluator's metrics, by evaluator name."""
        return {name: dict(ev.run(params)) for name, ev in self.evaluators.items()}

    def run(self, params: Any) -> Iterator[tuple[str, float]]:
        """The metrics the train loop logs (:meth:`task_metrics`)."""
        yield from self.task_metrics(self.results(params)).items()

    def task_metrics(self, results: dict[str, dict[str, float]]) -> dict[str, float]:
        """Per-task teacher-forced metrics; where the task's metric is not exact match, the selection task's
        ``accuracy`` is the decoded one (teacher-forced exact match kept as ``exact_match_teacher_forced``);
        ``<task>/rank_accuracy`` when ranked."""
        sel = self.data.selection_task
        out = dict(results["teacher_forced"])
        if "decoded" in results and self.data.needs_decoding:
            if f"{sel}/accuracy" in out:
                out[f"{sel}/{TEACHER_FORCED}"] = out.pop(f"{sel}/accuracy")
            out[f"{sel}/accuracy"] = results["decoded"]["accuracy"]
        if "rank_accuracy" in results.get("rank", {}):
            out[f"{sel}/rank_accuracy"] = results["rank"]["rank_accuracy"]
        return out

    def report_row(self, results: dict[str, dict[str, float]]) -> dict[str, Any]:
        """One row of the end-of-run table: examples scored / total, the task metric, losses, the decoded
        metrics (listed-choice share among them) and rank accuracy where run."""
        sel = self.data.selection_task
        total = self.data.split_size(self.split)
        row: dict[str, Any] = {"total": total}
        for k, v in results["teacher_forced"].items():
            task, _, name = k.partition("/")
            if name in ("label_loss", "rationale_loss"):
                row[name] = v
            if task == sel and name in ("accuracy", "examples"):
                row["teacher_forced_accuracy" if name == "accuracy" else "examples"] = v
        if "decoded" in results:
            row.update(results["decoded"])
            row.update(results.get("rank", {}))
        else:
            row["accuracy"] = row.get("teacher_forced_accuracy")
        row["subset"] = row.get("examples") is not None and int(row["examples"]) < total
        return row


def build(
    data: DataSource,
    cfg: ModelConfig,
    eval_fn: Callable,
    split: str,
    placement: Placement,
    *,
    max_examples: int | None = -1,
    decode_always: bool = False,
) -> SplitEvaluators:
    """The evaluators of ``split``, its eval sets read here once (``max_examples``: as ``DataSource.eval_sets``).
    The label rows are decoded where the task's metric needs it, or always with ``decode_always`` (the
    end-of-run table reports the decoded texts' metrics); ranked when ``data.rank_classification``."""
    sets = eval_sets(data, split, placement.local_batch, max_examples)
    tf = TeacherForced(eval_fn, sets, placement)
    sel = data.selection_task
    if sel not in sets:
        return SplitEvaluators(data, split, tf)
    if jax.process_count() > 1:
        if data.needs_decoding:
            log.warning("%s: the task metric needs decoding on one process; reporting teacher-forced exact match", sel)
        return SplitEvaluators(data, split, tf)
    rows = label_rows(sets[sel])
    decoded = None
    if decode_always or data.needs_decoding:
        decoded = Decoded(data, split, rows, cfg, placement.local_batch, data.targets_length, place=placement.put)
    rank = (
        RankClassification(data, split, rows, cfg, placement.local_batch, placement.sharding)
        if data.rank_classification
        else None
    )
    return SplitEvaluators(data, split, tf, decoded, rank)
