"""Where a task's rows come from, and which of them train: the benchmark's TFDS builder or a user's JSONL
(:class:`Source`), the rationale-quality selection over the training split (:class:`RationaleTable`,
``tasks/quality.py``), and the split's ``tf.data`` rows filtered by the data options (:func:`dataset_fn`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from dss_jax.tasks import quality, readers, tfds_builder

if TYPE_CHECKING:  # registry imports this module; the options are only read here
    from dss_jax.tasks.registry import DataOptions

log = logging.getLogger("dss_jax.data")
SOURCE_SHUFFLE_BUFFER = 100_000


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a benchmark's examples come from: the TFDS builder, or a user's JSONL files."""

    name: str
    benchmark: str | None = None
    data_dir: Path | None = None
    user_files: tuple[tuple[str, str], ...] = ()

    @property
    def _benchmark_dir(self) -> Path:
        """The released data's directory (a benchmark source always has one)."""
        if self.data_dir is None:
            raise ValueError(f"source {self.name!r}: a benchmark source needs a data_dir")
        return self.data_dir

    @property
    def splits(self) -> list[str]:
        if self.benchmark:
            return readers.available_splits(self._benchmark_dir, self.benchmark)
        return [s for s, _ in self.user_files]

    def examples(self, split: str) -> list[readers.Example]:
        """Python-side rows (for subsets, counts and the dss-data report)."""
        if self.benchmark:
            return readers.read_split(self._benchmark_dir, self.benchmark, split)
        files = dict(self.user_files)
        if split not in files:
            raise ValueError(f"{self.name} has no split {split!r}; splits: {self.splits}")
        carve = not files.get("validation")  # "" marks a validation split carved from train
        if carve and split in ("train", "validation"):
            examples = readers.read_user_jsonl(files["train"])
            keep, val = readers.carve_validation(len(examples))
            return [examples[i] for i in (keep if split == "train" else val)]
        return readers.read_user_jsonl(files[split])

    def tf_dataset(self, split: str, shuffle_files: bool) -> tf.data.Dataset:
        if self.benchmark:
            b = tfds_builder.builder(self.benchmark, self.data_dir)
            # no TFDS auto-cache: evaluations read parts of a split (a train subset, max_eval_examples) and a short
            # run part of an epoch, and TensorFlow warns each time a cache is left half-read; the files are small
            return b.as_dataset(split=split, shuffle_files=shuffle_files, read_config=tfds.ReadConfig(try_autocache=False))
        rows = [e.table_row() for e in self.examples(split)]
        cols = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
        return tf.data.Dataset.from_tensor_slices({k: tf.constant(v) for k, v in cols.items()})


def benchmark_source(benchmark: str, data_dir: str | None = None) -> Source:
    """One of the paper's benchmarks (data from ``data_dir`` or $DSS_DATA_DIR)."""
    if benchmark not in readers.BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {readers.BENCHMARKS} (or use register_user_data)")
    d = Path(data_dir) if data_dir else readers.default_data_dir()
    return Source(benchmark, benchmark=benchmark, data_dir=d)


def user_source(name: str, train_file: str, validation_file: str | None = None, test_file: str | None = None) -> Source:
    """A user's JSONL dataset; without a validation file, validation is carved from train (10%, seed 0), as for
    the paper's CQA and SVAMP."""
    files = [("train", train_file)]
    files += [("validation", validation_file)] if validation_file else []
    files += [("test", test_file)] if test_file else []
    for _, f in files:
        if not Path(f).exists():
            raise FileNotFoundError(f"register_user_data({name!r}): {f} not found")
    if not validation_file:  # "" marks a validation split carved from train
        files.insert(1, ("validation", ""))
    return Source(name, user_files=tuple(files))


def select_rationales(
    benchmark: str | None, examples: list[readers.Example], opts: DataOptions, vocabulary: seqio.Vocabulary | None
) -> tuple[np.ndarray, list[tuple[str, ...]], dict[str, int]]:
    """Which examples' rationales train under ``opts``, their extra rationales, and the counts (``tasks/quality.py``;
    dss-data reports them)."""

    def count_tokens(texts: list[str]) -> list[int]:
        if vocabulary is None:
            raise ValueError("max_rationale_tokens counts tokens: it needs the task's vocabulary")
        return [len(ids) + 1 for ids in vocabulary.tokenizer.encode(texts)] if texts else []  # +1: EOS

    counter = count_tokens if vocabulary is not None else None
    keep, counts = quality.select_rationales(
        examples,
        opts.rationale_filter,
        opts.max_rationale_tokens,
        benchmark,
        counter,
    )
    extras, more = quality.extra_rationales(examples, keep, opts.rationales_per_input, opts.max_rationale_tokens, counter)
    return keep, extras, {**counts, **(more if opts.rationales_per_input > 1 else {})}


@dataclasses.dataclass(frozen=True)
class RationaleTable:
    """The training split's rationale examples, per row (indexed by ``idx``): whether its own rationale trains,
    its extra rationales ("" padded to ``rationales_per_input - 1``), and the loss weights (``quality.weight_scale``)."""

    keep: np.ndarray
    extra: np.ndarray
    label_weight: int
    rationale_weight: np.ndarray

    @classmethod
    def build(cls, source: Source, opts: DataOptions, vocabulary: seqio.Vocabulary) -> RationaleTable:
        examples = source.examples("train")
        keep, extras, counts = select_rationales(source.benchmark, examples, opts, vocabulary)
        log.warning("%s: the data options train on rationales: %s", source.name, json.dumps(counts))
        rows = max((e.idx for e in examples), default=-1) + 1
        at = [e.idx for e in examples]
        table = cls(
            keep=np.zeros(rows, bool),
            extra=np.full((rows, opts.rationales_per_input - 1), "", object),
            label_weight=quality.weight_scale(opts.rationales_per_input),
            rationale_weight=np.ones(rows, np.int32),
        )
        table.keep[at] = keep
        for i, x in zip(at, extras, strict=True):
            table.extra[i, : len(x)] = x
            table.rationale_weight[i] = table.label_weight // (1 + len(x))
        return table


def mark_rationales(ds: tf.data.Dataset, table: RationaleTable | None) -> tf.data.Dataset:
    """Adds what the rationale examples need to each row: ``keep_rationale``, ``extra_rationales`` and the loss
    weights of its label and rationale examples (no table: every rationale, one per input, weight 1)."""
    if table is None:
        fixed = {
            "keep_rationale": tf.constant(True),
            "extra_rationales": tf.zeros([0], tf.string),
            "label_weight": tf.constant(1, tf.int32),
            "rationale_weight": tf.constant(1, tf.int32),
        }
        return ds.map(lambda ex: {**ex, **fixed})
    keep, extra = tf.constant(table.keep), tf.constant(table.extra.astype(str))
    weight = tf.constant(table.rationale_weight)

    def add(ex: dict) -> dict:
        i = tf.cast(ex["idx"], tf.int32)
        return {
            **ex,
            "keep_rationale": tf.gather(keep, i),
            "extra_rationales": tf.gather(extra, i),
            "label_weight": tf.constant(table.label_weight, tf.int32),
            "rationale_weight": tf.gather(weight, i),
        }

    return ds.map(add)


def rationale_rows(ex: dict) -> tf.data.Dataset:
    """The row once per rationale that trains (``rationale`` set to it): none when a data option dropped it, else
    its own and its extras."""
    texts = tf.concat([[ex["rationale"]], ex["extra_rationales"]], 0)
    k = tf.where(ex["keep_rationale"], 1 + tf.math.count_nonzero(ex["extra_rationales"] != "", dtype=tf.int32), 0)
    return tf.data.Dataset.from_tensor_slices(texts[:k]).map(lambda t: {**ex, "rationale": t})


def dataset_fn(
    source: Source,
    opts: DataOptions,
    kind: str,
    needs_teacher: bool,
    table: RationaleTable | None,
    split: str,
    shuffle_files: bool,
    seed: int | None = None,
) -> tf.data.Dataset:
    """Rows of one split, filtered by teacher availability, parse policy, training fraction and rationale quality.

    The paired DSS task shuffles inputs here, before each is expanded into its label and rationale examples, so
    both land in the same step; such tasks are read with ``shuffle=False``.
    """
    ds = source.tf_dataset(split, shuffle_files)
    rows = int(ds.cardinality())  # before the filters: at least the number of rows the shuffle below sees
    if needs_teacher:
        ds = ds.filter(lambda ex: ex["has_teacher"])
        if opts.on_parse_failure == "drop":
            ds = ds.filter(lambda ex: ex["parse_ok"])
    if split == "train" and opts.train_fraction < 1.0:
        idx = np.array([e.idx for e in source.examples("train")], np.int64)
        keep = tf.constant(idx[readers.training_subset(len(idx), opts.train_fraction, opts.subset_seed)])
        ds = ds.filter(lambda ex: tf.reduce_any(tf.equal(tf.cast(ex["idx"], tf.int64), keep)))
    ds = mark_rationales(ds, table if split == "train" else None)
    if kind == "rationale":
        ds = ds.flat_map(rationale_rows)
    elif kind == "single_task":
        ds = ds.filter(lambda ex: ex["keep_rationale"])
    if kind == "paired" and split == "train":
        seed = opts.subset_seed if seed is None else seed
        ds = ds.shuffle(shuffle_buffer_size(rows), seed=seed, reshuffle_each_iteration=True)
    return ds


def shuffle_buffer_size(rows: int) -> int:
    """The paired task's shuffle buffer: ``SOURCE_SHUFFLE_BUFFER``, or the split's row count when smaller.

    A buffer at least as large as the input holds all of it before the first draw, so it yields the same order as
    any larger buffer (the same draws from the same seed over the same elements). tf.data saves every slot of a
    shuffle buffer with the iterator's position, filled or not (~180-360 bytes each): a 100k buffer made every
    data-iterator state 35-53 MB for splits of a few thousand rows. ``rows`` < 0: cardinality unknown."""
    return SOURCE_SHUFFLE_BUFFER if rows < 0 else max(1, min(SOURCE_SHUFFLE_BUFFER, rows))
