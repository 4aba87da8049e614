"""Steps whose shapes follow the data: the same examples as a padded batch, without the padding.

The input pipeline yields unpacked rows padded to the configured lengths (1024/256 in the paper's recipe), so
a step holds exactly the configured number of inputs with both targets. ``Repacker`` then removes the padding
from each batch, in numpy, before the step sees it:

- ``"bucketed"``: the rows stay as they are, grouped by task; each task's columns are cut to the smallest length
  buckets that hold its longest input and longest target, so short label targets are not padded to the
  rationales' length. Tasks whose buckets coincide share one group. A step then holds one group of rows per
  distinct shape (``row_groups``): the first under the usual keys, the others under ``g1/``, ``g2/``, ...
- ``"packed"``: the batch's sequences (encoder part and decoder part together) are packed first-fit into rows
  of bucketed lengths, with segment ids and positions, and the row count is rounded up to a multiple of
  ``rows_bucket``. Every sequence keeps its own tokens, loss weights and task ids; attention never crosses a
  segment, so the loss (per-task token means over real tokens) is the padded step's.

Lengths and row counts come from a few buckets, so XLA compiles a handful of step shapes, not one per batch.
Each input shard is repacked on its own, and all shards of all processes agree on one shape per step (the
largest any of them needs): one process reading n shards makes the batch n processes make. No TensorFlow here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

MODES = ("padded", "bucketed", "packed")
LENGTH_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
# Bucketed rows hold one sequence each, so their lengths follow the data closely: steps of 16 up to 128 (a CQA
# input is ~50-80 tokens, a label target 2-5). A run's batch maxima cluster in one or two buckets per task, so
# the finer steps add few compiled shapes. (Packing picks its row lengths at 1x/2x/4x the longest sequence from
# LENGTH_BUCKETS, whose coarser steps leave room for a second sequence.)
BUCKETED_LENGTHS = (8, 16, 32, 48, 64, 80, 96, 112, 128) + LENGTH_BUCKETS[6:]
ENC_KEYS = ("encoder_input_tokens",)
DEC_KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights", "decoder_task_ids")
MAX_TASK_ID = 7  # task ids a bucketed step may group by (the DSS tasks are 1 and 2; 0 is padding)


def group_prefix(g: int) -> str:
    return "" if g == 0 else f"g{g}/"


def row_groups(batch: dict) -> list[dict]:
    """A step's groups of rows (each with its own shape): keys without a prefix, then ``g1/...``, ``g2/...``."""
    groups: list[dict] = []
    while True:
        p = group_prefix(len(groups))
        g = {k[len(p) :]: v for k, v in batch.items() if k.startswith(p) and (p or "/" not in k)}
        if not g:
            return groups
        groups.append(g)


def computed_tokens(batch: dict) -> int:
    """Token positions a step computes (padding included), over all its row groups."""
    return sum(int(g["encoder_input_tokens"].size + g["decoder_target_tokens"].size) for g in row_groups(batch))


def bucket(n: int, cap: int, buckets: Sequence[int] = LENGTH_BUCKETS) -> int:
    """The smallest bucket >= n (at most ``cap``, the configured length)."""
    for b in buckets:
        if b >= n:
            return min(b, cap)
    return cap


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def side_by_side(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batches with the same keys, their rows concatenated in order."""
    return {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}


def real_lengths(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per row: encoder tokens up to the last non-pad one, decoder tokens up to the last weighted one."""
    enc = batch["encoder_input_tokens"] != 0
    dec = (batch["decoder_loss_weights"] > 0) | (batch["decoder_target_tokens"] != 0)
    last = lambda m: np.where(m.any(1), m.shape[1] - np.argmax(m[:, ::-1], axis=1), 0)  # noqa: E731
    return last(enc), last(dec)


def first_fit(enc_len: np.ndarray, dec_len: np.ndarray, enc_budget: int, dec_budget: int) -> list[list[int]]:
    """Rows of sequence indices, first-fit by decreasing encoder length, both budgets respected."""
    rows: list[list[int]] = []
    used: list[list[int]] = []
    for i in sorted(range(len(enc_len)), key=lambda i: (-int(enc_len[i]), -int(dec_len[i]), i)):
        e, t = int(enc_len[i]), int(dec_len[i])
        if e == 0 and t == 0:
            continue  # an all-padding row (a short last batch): nothing to place
        for r, (ue, ut) in enumerate(used):
            if ue + e <= enc_budget and ut + t <= dec_budget:
                rows[r].append(i)
                used[r] = [ue + e, ut + t]
                break
        else:
            rows.append([i])
            used.append([e, t])
    return rows


@dataclasses.dataclass(frozen=True)
class Shape:
    rows: int
    enc: int
    dec: int


@dataclasses.dataclass
class Repacker:
    """Removes a padded batch's padding (see the module docstring); counts tokens before and after."""

    mode: str = "packed"
    inputs_length: int = 1024
    targets_length: int = 256
    rows_multiple: int = 1
    rows_bucket: int = 8
    agree: bool = True  # multi-process: every process uses the largest shape any of them needs
    padded_tokens: int = 0
    computed_tokens: int = 0
    real_tokens: int = 0
    at_length_limit: int = 0  # sequences that fill the configured length: the pipeline cut them (or they fit exactly)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"batching mode {self.mode!r}; expected one of {MODES}")
        if self.rows_bucket % self.rows_multiple:
            self.rows_bucket = round_up(self.rows_bucket, self.rows_multiple)

    def task_shapes(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Bucketed: [MAX_TASK_ID + 1, 3] (rows, encoder, decoder length) per task id; zeros for absent tasks."""
        enc_len, dec_len = real_lengths(batch)
        task = batch["decoder_task_ids"][:, 0]
        real = (enc_len > 0) | (dec_len > 0)  # all-padding rows (a short last batch) are dropped
        out = np.zeros((MAX_TASK_ID + 1, 3), np.int64)
        for t in np.unique(task[real]):
            if not 0 <= t <= MAX_TASK_ID:
                raise ValueError(f"decoder_task_ids holds task id {t}; bucketed batching groups ids 0..{MAX_TASK_ID}")
            m = (task == t) & real
            e = bucket(int(enc_len[m].max(initial=1)), self.inputs_length, BUCKETED_LENGTHS)
            d = bucket(int(dec_len[m].max(initial=1)), self.targets_length, BUCKETED_LENGTHS)
            out[t] = (round_up(int(m.sum()), self.rows_multiple), e, d)
        return out

    def _best_packing(self, enc_len: np.ndarray, dec_len: np.ndarray) -> tuple[Shape, list[list[int]]]:
        """Row lengths from the buckets at 1x, 2x and 4x the longest sequence: the cheapest packing wins.

        Cost ~ tokens computed, with attention's quadratic part: rows * (E + T) * (1 + (E + T) / 1024).
        """
        enc = bucket(int(enc_len.max(initial=1)), self.inputs_length)
        dec = bucket(int(dec_len.max(initial=1)), self.targets_length)
        best = None
        for e in sorted({bucket(enc * f, self.inputs_length) for f in (1, 2, 4)}):
            for t in sorted({bucket(dec * f, self.targets_length) for f in (1, 2, 4)}):
                rows = first_fit(enc_len, dec_len, e, t)
                n = max(round_up(len(rows), self.rows_bucket), self.rows_bucket)
                cost = n * (e + t) * (1 + (e + t) / 1024)
                if best is None or cost < best[0]:
                    best = (cost, Shape(n, e, t), rows)
        assert best is not None  # the loops above try at least one shape
        return best[1], best[2]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.repack([batch])

    def repack(self, parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Each input shard's batch (``parts``) repacked on its own, all at one shape (the largest that any shard
        of any process needs), then side by side: one process reading n shards yields the rows that n processes
        reading one shard each assemble, so a single-host run reproduces a multi-host one."""
        if self.mode == "padded":
            return side_by_side(parts)
        lengths = [real_lengths(b) for b in parts]
        for b, (enc_len, dec_len) in zip(parts, lengths, strict=True):
            self.padded_tokens += int(b["encoder_input_tokens"].size + b["decoder_target_tokens"].size)
            self.real_tokens += int(enc_len.sum() + dec_len.sum())
            self.at_length_limit += int(np.sum((enc_len >= self.inputs_length) | (dec_len >= self.targets_length)))
        if self.mode == "bucketed":
            shapes = self._agree(np.max([self.task_shapes(b) for b in parts], axis=0))
            outs = [self._bucketed(b, shapes, (e > 0) | (d > 0)) for b, (e, d) in zip(parts, lengths, strict=True)]
        else:
            packings = [self._best_packing(e, d) for e, d in lengths]
            agreed = self._agree(np.max([[s.rows, s.enc, s.dec] for s, _ in packings], axis=0)[None])[0]
            shape = Shape(*(int(x) for x in agreed))
            if any(len(rows) > shape.rows for _, rows in packings):  # cannot happen: the agreed shape is the largest
                raise AssertionError("packed rows exceed the agreed row count")
            outs = [self._pack(b, shape, rows, e, d) for b, (_, rows), (e, d) in zip(parts, packings, lengths, strict=True)]
        out = side_by_side(outs)
        self.computed_tokens += computed_tokens(out)
        return out

    def _agree(self, shapes: np.ndarray) -> np.ndarray:
        """Multi-process: the elementwise largest of every process's shapes (one process: its own)."""
        import jax

        if not self.agree or jax.process_count() == 1:
            return shapes
        from jax.experimental import multihost_utils

        gathered = np.asarray(multihost_utils.process_allgather(shapes))
        return gathered.reshape((-1,) + shapes.shape).max(0)

    @staticmethod
    def _bucketed(batch: dict[str, np.ndarray], task_shapes: np.ndarray, real: np.ndarray) -> dict[str, np.ndarray]:
        """Each task's ``real`` (not all-padding) rows cut to its shape (``task_shapes``); tasks of the same shape
        form one row group."""
        task = batch["decoder_task_ids"][:, 0]
        by_shape: dict[tuple[int, int], list[int]] = {}
        for t in np.flatnonzero(task_shapes[:, 0]):
            by_shape.setdefault((int(task_shapes[t, 1]), int(task_shapes[t, 2])), []).append(int(t))
        out = {}
        for g, ((e, d), tasks) in enumerate(sorted(by_shape.items(), key=lambda kv: kv[1])):
            rows = int(sum(task_shapes[t, 0] for t in tasks))
            keep = np.isin(task, tasks) & real
            for k, v in batch.items():
                v = v[keep][:, :e] if k.startswith("encoder_") else v[keep][:, :d]
                pad = np.zeros((rows - v.shape[0],) + v.shape[1:], v.dtype)
                out[group_prefix(g) + k] = np.concatenate([v, pad])
        return out

    @staticmethod
    def _pack(
        batch: dict[str, np.ndarray], s: Shape, rows: list[list[int]], enc_len: np.ndarray, dec_len: np.ndarray
    ) -> dict[str, np.ndarray]:
        def zeros(n: int, like: np.ndarray) -> np.ndarray:
            return np.zeros((s.rows, n), like.dtype)

        out = {k: zeros(s.enc if k in ENC_KEYS else s.dec, batch[k]) for k in ENC_KEYS + DEC_KEYS}
        for side, n in (("encoder", s.enc), ("decoder", s.dec)):
            out[f"{side}_segment_ids"] = np.zeros((s.rows, n), np.int32)
            out[f"{side}_positions"] = np.zeros((s.rows, n), np.int32)
        for r, members in enumerate(rows):
            e0 = d0 = 0
            for seg, i in enumerate(members, 1):
                e, t = int(enc_len[i]), int(dec_len[i])
                for k in ENC_KEYS:
                    out[k][r, e0 : e0 + e] = batch[k][i, :e]
                for k in DEC_KEYS:
                    out[k][r, d0 : d0 + t] = batch[k][i, :t]
                out["encoder_segment_ids"][r, e0 : e0 + e] = seg
                out["decoder_segment_ids"][r, d0 : d0 + t] = seg
                out["encoder_positions"][r, e0 : e0 + e] = np.arange(e)
                out["decoder_positions"][r, d0 : d0 + t] = np.arange(t)
                e0, d0 = e0 + e, d0 + t
        return out

    def stats(self) -> dict[str, float]:
        return {
            "padded_tokens": self.padded_tokens,
            "computed_tokens": self.computed_tokens,
            "real_tokens": self.real_tokens,
            "computed_fill": self.real_tokens / max(1, self.computed_tokens),
            "at_length_limit": self.at_length_limit,
        }


class RepackingIterator:
    """Wraps a process's input shards (keeping their save/restore) and repacks every step's batch, each shard's
    rows on their own (``Repacker.repack``)."""

    def __init__(self, it: ShardedIterator, repacker: Repacker):
        self.it, self.repacker = it, repacker

    def __iter__(self) -> RepackingIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.repacker.repack(self.it.next_parts())

    def save(self, path: str) -> None:
        self.it.save(path)

    def restore(self, path: str) -> None:
        self.it.restore(path)


class ShardedIterator:
    """Concatenates the batches of several input shards read by this process (rows of shard 0 first).

    One process reading shards 0..n-1 yields exactly the global batch that n processes reading one shard
    each assemble, so a multi-host run can be checked against a single-host one.
    """

    def __init__(self, iterators: list):
        self.iterators = iterators

    def __iter__(self) -> ShardedIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return side_by_side(self.next_parts())

    def next_parts(self) -> list[dict[str, np.ndarray]]:
        """The next batch of each shard."""
        return [next(it) for it in self.iterators]

    @property
    def checkpointable(self) -> bool:
        return all(hasattr(it, "save") and hasattr(it, "restore") for it in self.iterators)

    def save(self, path: str) -> None:
        if self.checkpointable:
            for i, it in enumerate(self.iterators):
                it.save(f"{path}_shard{i}")

    def restore(self, path: str) -> None:
        if not self.checkpointable:
            logging.getLogger("dss_jax.train").warning(
                "the data source cannot restore its position: the resumed run sees data from the start"
            )
            return
        for i, it in enumerate(self.iterators):
            it.restore(f"{path}_shard{i}")
