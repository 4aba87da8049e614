"""From a SeqIO task or mixture to the plain iterator of numpy batches that the trainer consumes.

The encoder-decoder feature converter (packing or padding) is seqio's, extended by one per-token feature,
``decoder_task_ids`` (1 label, 2 rationale, 0 padding), which packing keeps aligned with the targets.
Training iterators can be saved and restored exactly (tf.train.Checkpoint on the tf.data iterator), so an
interrupted run continues with the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import numpy as np
import seqio
import tensorflow as tf

from dss_jax.tasks import registry


class DssEncDecFeatureConverter(seqio.EncDecFeatureConverter):
    """seqio's EncDecFeatureConverter plus the per-token task id of every target token."""

    TASK_FEATURES = {
        **seqio.EncDecFeatureConverter.TASK_FEATURES,
        "targets_task": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }
    MODEL_FEATURES = {
        **seqio.EncDecFeatureConverter.MODEL_FEATURES,
        "decoder_task_ids": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }

    def _convert_example(self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
        d = dict(super()._convert_example(features))
        d["decoder_task_ids"] = features["targets_task"]
        return d

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
        lengths["decoder_task_ids"] = task_feature_lengths["targets"]
        return lengths


def feature_lengths(inputs_length: int, targets_length: int) -> dict[str, int]:
    return {"inputs": inputs_length, "targets": targets_length, "targets_task": targets_length}


class BatchIterator:
    """numpy batches from a tf.data pipeline; ``save``/``restore`` checkpoint its exact position."""

    def __init__(self, ds: tf.data.Dataset):
        self._ds = ds
        self._it = iter(ds)
        self._ckpt = tf.train.Checkpoint(ds=self._it)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in next(self._it).items()}

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._ckpt.write(path)

    def restore(self, path: str) -> None:
        self._ckpt.read(path).assert_consumed()


def get_dataset(
    name: str,
    split: str,
    inputs_length: int,
    targets_length: int,
    batch_size: int,
    pack: bool,
    shuffle: bool,
    seed: int | None,
    num_epochs: int | None,
    shard_id: int = 0,
    num_shards: int = 1,
    drop_remainder: bool = True,
) -> tf.data.Dataset:
    """Converted and batched dataset of a registered task or mixture (this process's shard only)."""
    # The paired DSS tasks shuffle inputs in their source, keeping each input's two targets adjacent.
    shuffle_examples = shuffle and not registry.shuffles_in_source(name)
    ds = seqio.get_dataset(
        name,
        feature_lengths(inputs_length, targets_length),
        dataset_split=split,
        shuffle=shuffle_examples,
        num_epochs=num_epochs,
        shard_info=seqio.ShardInfo(shard_id, num_shards),
        feature_converter=DssEncDecFeatureConverter(pack=pack),
        seed=seed,
    )
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(2)


def train_batches(name: str, inputs_length: int, targets_length: int, batch_size: int, pack: bool, seed: int,
                  shard_id: int = 0, num_shards: int = 1) -> BatchIterator:
    ds = get_dataset(name, "train", inputs_length, targets_length, batch_size, pack, True, seed, None, shard_id, num_shards)
    return BatchIterator(ds)


def eval_examples(name: str, split: str) -> list[dict]:
    """The un-converted eval examples (text and tokens) of a task split, in order."""
    task = seqio.get_mixture_or_task(name)
    ds = task.get_dataset(None, split=split, shuffle=False, num_epochs=1)
    return list(ds.as_numpy_iterator())
