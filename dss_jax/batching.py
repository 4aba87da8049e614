"""Steps whose shapes follow the data: the same examples as a padded batch, without the padding.

The input pipeline yields unpacked rows padded to the configured lengths (1024/256 in the paper's recipe), so
a step holds exactly the configured number of inputs with both targets. ``Repacker`` then removes the padding
from each batch, in numpy, before the step sees it:

- ``"bucketed"``: the rows stay as they are, grouped by task; each task's columns are cut to the smallest length
  buckets that hold its longest input and longest target, so short label targets are not padded to the
  rationales' length. Tasks whose buckets coincide share one group. A step then holds one group of rows per
  distinct shape (``row_groups``): the first under the usual keys, the others under ``g1/``, ``g2/``, ...
- ``"packed"``: the batch's sequences (encoder part and decoder part together) are packed into rows, with
  segment ids and positions. The step's shape (rows, a multiple of ``rows_bucket``; encoder and decoder row
  lengths from ``PACKED_LENGTHS``) is the cheapest one ``pack_rows`` can fill, the cost counting decoder tokens
  at ``DECODER_TOKEN_COST`` and the attention each row computes. Every sequence keeps its own tokens, loss
  weights and task ids; attention never crosses a segment, so the loss (per-task token means over real tokens)
  is the padded step's.

Lengths and row counts come from a few buckets, so XLA compiles a handful of step shapes, not one per batch.
Each input shard is repacked on its own, and all shards of all processes agree on one shape per step (bucketed:
the largest any of them needs; packed: the cheapest all of them fill): one process reading n shards makes the batch
n processes make. No TensorFlow here.
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
# the finer steps add few compiled shapes.
BUCKETED_LENGTHS = (8, 16, 32, 48, 64, 80, 96, 112, 128) + LENGTH_BUCKETS[6:]
# Packed row lengths: steps of 8 up to 128, then ~6% steps (16 to 256, 32 to 512, 64 to 1024); the row count's
# steps (multiples of rows_bucket) and the choice between encoder and decoder lengths take up the rest. On the
# paper's CQA batches (128 sequences, rows in 8s) a run compiles ~5 step shapes in 40 batches (e-SNLI, SVAMP:
# 10-14), computing ~1.08x the tokens' real FLOPs against ~1.3x for first-fit at 1x/2x/4x the longest sequence.
PACKED_LENGTHS = tuple(range(16, 128, 8)) + tuple(range(128, 256, 16)) + tuple(range(256, 512, 32))
PACKED_LENGTHS += tuple(range(512, 1024, 64)) + (1024, 1280, 1536, 2048)
# A decoder token's matmuls (self-attention, cross-attention's query and output, the MLP, the output head) against
# an encoder token's (its layer, and the keys and values each decoder layer's cross-attention makes of it):
# ~1.25 in T5 v1.1 base (flops.model_shape).
DECODER_TOKEN_COST = 1.25
# A computed (query, key) pair of attention costs ~4 x width FLOPs a layer, a token's matmuls ~2 x 7M in T5 v1.1
# base: a pair is ~1/4,096 of a token there (more in smaller models, less in larger ones).
ATTENTION_PAIRS_PER_TOKEN = 4096.0
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


def pack_rows(enc_len: np.ndarray, dec_len: np.ndarray, rows: int, enc_budget: int, dec_budget: int) -> list[list[int]] | None:
    """The sequences (indices; all-padding ones left out) in at most ``rows`` rows whose encoder and decoder parts
    fit the budgets, or None when this heuristic finds no way.

    Sequences heavier on the decoder side than on the encoder side (relative to the budgets: DSS rationales) go
    first, each to the row that takes it with the least decoder load, which spreads them evenly; the others (label
    sequences) then go best-fit by encoder room. Each kind in decreasing size. A first-fit by encoder length
    stacks rationales into the first rows and leaves about half of the decoder slots empty.
    """
    idx = np.flatnonzero((enc_len > 0) | (dec_len > 0))
    if max(np.sum(2 * enc_len > enc_budget), np.sum(2 * dec_len > dec_budget)) > rows:
        return None  # more sequences over half a row than rows: no two of them share one
    enc_share, dec_share = enc_len / enc_budget, dec_len / dec_budget
    order = sorted(idx, key=lambda i: (bool(dec_share[i] <= enc_share[i]), -max(enc_share[i], dec_share[i]), i))
    used_enc, used_dec = np.zeros(rows, np.int64), np.zeros(rows, np.int64)
    members: list[list[int]] = [[] for _ in range(rows)]
    never = np.iinfo(np.int64).max
    for i in order:
        e, d = int(enc_len[i]), int(dec_len[i])
        fits = (used_enc + e <= enc_budget) & (used_dec + d <= dec_budget)
        if not fits.any():
            return None
        score = used_dec if dec_share[i] > enc_share[i] else enc_budget - used_enc
        r = int(np.argmin(np.where(fits, score, never)))
        used_enc[r] += e
        used_dec[r] += d
        members[r].append(int(i))
    return [m for m in members if m]


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
    max_tries: int = 64  # shapes tried per batch before one sequence per row
    agree: bool = True  # multi-process: every process agrees on the step's shape (``repack``)
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

    def candidates(self, count: int, e_max: int, d_max: int, e_sum: int, d_sum: int) -> list[Shape]:
        """Step shapes for batches of at most ``count`` sequences, ``e_max``/``d_max`` tokens long and ``e_sum``/
        ``d_sum`` tokens in all: the ``max_tries`` cheapest whose budgets hold the tokens, in order of cost ~ FLOPs,
        rows x (E + DECODER_TOKEN_COST x T + (E^2 + T^2 + E T) / ATTENTION_PAIRS_PER_TOKEN); then one sequence per
        row, which always fits."""
        enc = np.array(sorted({bucket(n, self.inputs_length, PACKED_LENGTHS) for n in (e_max, *PACKED_LENGTHS) if n >= e_max}))
        dec = np.array(sorted({bucket(n, self.targets_length, PACKED_LENGTHS) for n in (d_max, *PACKED_LENGTHS) if n >= d_max}))
        rows = np.arange(self.rows_bucket, round_up(count, self.rows_bucket) + 1, self.rows_bucket)
        n, e, t = (a.ravel() for a in np.meshgrid(rows, enc, dec, indexing="ij"))
        ok = (n * e >= e_sum) & (n * t >= d_sum)
        cost = n * (e + DECODER_TOKEN_COST * t + (e * e + t * t + e * t) / ATTENTION_PAIRS_PER_TOKEN)
        order = np.flatnonzero(ok)[np.argsort(cost[ok], kind="stable")][: self.max_tries]
        return [Shape(int(n[k]), int(e[k]), int(t[k])) for k in order] + [Shape(int(rows[-1]), int(enc[0]), int(dec[0]))]

    def packing(self, lengths: list[tuple[np.ndarray, np.ndarray]]) -> tuple[Shape, list[list[list[int]]]]:
        """One shape for every input shard of every process, the cheapest of ``candidates`` that ``pack_rows`` fills
        for all of them, and each shard's rows at that shape (``lengths``: each shard's real encoder and decoder
        lengths). Processes agree on the batch statistics, then on the first candidate every one of them fills."""
        stats = [
            [max(1, int(((e > 0) | (d > 0)).sum())), int(e.max(initial=1)), int(d.max(initial=1)), int(e.sum()), int(d.sum())]
            for e, d in lengths
        ]  # fmt: skip
        cands = self.candidates(*(int(x) for x in self._agree(np.max(stats, axis=0)[None])[0]))
        tried: dict[int, list[list[list[int]] | None]] = {}

        def fills(i: int) -> bool:
            if i not in tried:
                tried[i] = [pack_rows(e, d, cands[i].rows, cands[i].enc, cands[i].dec) for e, d in lengths]
            return all(rows is not None for rows in tried[i])

        k = 0
        while True:  # every process sees the same maxima, so they all stop on the same round
            local = next((i for i in range(k, len(cands) - 1) if fills(i)), len(cands) - 1)
            agreed = int(self._agree(np.array([[local]]))[0, 0])
            if agreed == k:
                break
            k = agreed
        if k == len(cands) - 1:  # one sequence per row
            return cands[k], [[[int(i)] for i in np.flatnonzero((e > 0) | (d > 0))] for e, d in lengths]
        return cands[k], [rows for rows in tried[k] if rows is not None]  # every shard's, as fills(k) held

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.repack([batch])

    def repack(self, parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Each input shard's batch (``parts``) repacked on its own, all at one shape (bucketed: the largest that
        any shard of any process needs; packed: one that every shard of every process fills), then side by side:
        one process reading n shards yields the rows that n processes reading one shard each assemble, so a
        single-host run reproduces a multi-host one."""
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
            shape, packed = self.packing(lengths)
            outs = [self._pack(b, shape, rows, e, d) for b, rows, (e, d) in zip(parts, packed, lengths, strict=True)]
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
