"""Steps whose shapes follow the data: the same examples as a padded batch, without the padding.

The input pipeline yields unpacked rows padded to the configured lengths (1024/256 in the paper's recipe), so
a step holds exactly the configured number of inputs with both targets. ``Repacker`` then removes the padding
from each batch, in numpy, before the step sees it:

- ``"bucketed"``: the rows stay as they are; the columns are cut to the smallest length bucket that holds the
  batch's longest input and longest target.
- ``"packed"``: the batch's sequences (encoder part and decoder part together) are packed first-fit into rows
  of bucketed lengths, with segment ids and positions, and the row count is rounded up to a multiple of
  ``rows_bucket``. Every sequence keeps its own tokens, loss weights and task ids; attention never crosses a
  segment, so the loss (per-task token means over real tokens) is the padded step's.

Lengths and row counts come from a few buckets, so XLA compiles a handful of step shapes, not one per batch.
Multi-process runs agree on one shape per step (the largest any process needs). No TensorFlow here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

MODES = ("padded", "bucketed", "packed")
LENGTH_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
ENC_KEYS = ("encoder_input_tokens",)
DEC_KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights", "decoder_task_ids")


def bucket(n: int, cap: int, buckets: Sequence[int] = LENGTH_BUCKETS) -> int:
    """The smallest bucket >= n (at most ``cap``, the configured length)."""
    for b in buckets:
        if b >= n:
            return min(b, cap)
    return cap


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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

    def shape_for(self, batch: dict[str, np.ndarray]) -> tuple[Shape, list[list[int]] | None]:
        enc_len, dec_len = real_lengths(batch)
        n = len(enc_len)
        enc = bucket(int(enc_len.max(initial=1)), self.inputs_length)
        dec = bucket(int(dec_len.max(initial=1)), self.targets_length)
        if self.mode == "packed":
            return self._best_packing(enc_len, dec_len, enc, dec)
        return Shape(round_up(n, self.rows_multiple), enc, dec), None

    def _best_packing(self, enc_len: np.ndarray, dec_len: np.ndarray, enc: int, dec: int) -> tuple[Shape, list[list[int]]]:
        """Row lengths from the buckets at 1x, 2x and 4x the longest sequence: the cheapest packing wins.

        Cost ~ tokens computed, with attention's quadratic part: rows * (E + T) * (1 + (E + T) / 1024).
        """
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
        if self.mode == "padded":
            return batch
        shape, rows = self.shape_for(batch)
        shape = self._agree(shape)
        if rows is not None and len(rows) > shape.rows:  # cannot happen: the agreed shape is at least ours
            raise AssertionError("packed rows exceed the agreed row count")
        enc_len, dec_len = real_lengths(batch)
        self.padded_tokens += int(batch["encoder_input_tokens"].size + batch["decoder_target_tokens"].size)
        self.real_tokens += int(enc_len.sum() + dec_len.sum())
        self.at_length_limit += int(np.sum((enc_len >= self.inputs_length) | (dec_len >= self.targets_length)))
        self.computed_tokens += shape.rows * (shape.enc + shape.dec)
        if rows is None:
            return self._trim(batch, shape)
        return self._pack(batch, shape, rows, enc_len, dec_len)

    def _agree(self, shape: Shape) -> Shape:
        import jax

        if not self.agree or jax.process_count() == 1:
            return shape
        from jax.experimental import multihost_utils

        all_shapes = np.asarray(multihost_utils.process_allgather(np.array([shape.rows, shape.enc, shape.dec])))
        return Shape(*(int(x) for x in all_shapes.reshape(-1, 3).max(0)))

    @staticmethod
    def _trim(batch: dict[str, np.ndarray], s: Shape) -> dict[str, np.ndarray]:
        out = {}
        for k, v in batch.items():
            v = v[:, : s.enc] if k.startswith("encoder_") else v[:, : s.dec]
            if v.shape[0] < s.rows:
                v = np.concatenate([v, np.zeros((s.rows - v.shape[0],) + v.shape[1:], v.dtype)])
            out[k] = v
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


class SavableIterator(Protocol):
    """A batch iterator whose position can be saved and restored (a tf.data iterator's checkpoint files)."""

    def __next__(self) -> dict[str, np.ndarray]: ...
    def save(self, path: str) -> None: ...
    def restore(self, path: str) -> None: ...


class RepackingIterator:
    """Wraps a batch iterator (keeping its save/restore) and repacks every batch it yields."""

    def __init__(self, it: SavableIterator, repacker: Repacker):
        self.it, self.repacker = it, repacker

    def __iter__(self) -> RepackingIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.repacker(next(self.it))

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
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

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
