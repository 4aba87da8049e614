"""What the trainer, the evaluators and dss-eval need from the data layer: every member, so nothing is probed.

``dss_jax.tasks.pipeline.SeqioData`` is the implementation; the protocol keeps the core free of TensorFlow and
seqio (they stay in ``tasks/``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from dss_jax import batching

Batch = dict[str, np.ndarray]


class DataSource(Protocol):
    """Training batches, evaluation sets and the selection task's scoring, as ``dss-train`` reads them."""

    benchmark: str
    inputs_length: int
    targets_length: int
    rank_classification: bool  # also score the selection task by ranking its candidate labels

    @property
    def selection_task(self) -> str:
        """The label task whose validation accuracy selects checkpoints."""
        ...

    @property
    def vocabulary_file(self) -> str:
        """The SentencePiece model file, copied into the model dir."""
        ...

    @property
    def needs_decoding(self) -> bool:
        """True when the task's metric is not exact match of the label text (SVAMP: equation value)."""
        ...

    def train_iterator(self, batch_size: int, seed: int, shard_id: int, num_shards: int) -> Iterator[Batch]: ...

    def repacker(self, rows_multiple: int) -> batching.Repacker | None:
        """Removes padding from each training batch; None when the batches stay padded."""
        ...

    def eval_sets(
        self, split: str, batch_size: int, shard_id: int, num_shards: int, max_examples: int | None = -1
    ) -> dict[str, list[Batch]]:
        """Unpacked eval batches per eval task (the selection task's first)."""
        ...

    def inference_format(self) -> dict[str, Any]:
        """How raw inputs become model inputs at inference (the model dir's ``inference.json``)."""
        ...

    def split_size(self, split: str) -> int: ...

    def baselines(self, split: str) -> dict[str, float]:
        """The task's trivial baselines on ``split`` (majority class and the like), in percent."""
        ...

    def candidate_labels(self, split: str, n: int) -> list[list[str]] | None:
        """The first ``n`` examples' candidate labels (None: the task has no closed label set)."""
        ...

    def selection_examples(self, split: str) -> list[dict]:
        """The selection task's unconverted examples of ``split`` (text and tokens), in order."""
        ...

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Target texts -> token ids through EOS."""
        ...

    def detokenize(self, rows: list[list[int]]) -> list[str]:
        """Output ids (already cut before EOS) -> text."""
        ...

    def score(self, split: str, predictions: list[str]) -> dict[str, float]:
        """The task's own metric of label texts, in the order of the split's first ``len(predictions)`` examples."""
        ...
