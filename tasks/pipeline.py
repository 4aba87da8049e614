"""From a SeqIO task or mixture to the plain iterator of numpy batches that the trainer consumes.

The encoder-decoder feature converter (packing or padding) is seqio's, extended by one per-token feature,
``decoder_task_ids`` (1 label, 2 rationale, 0 padding), which packing keeps aligned with the targets.
Training iterators can be saved and restored exactly (tf.train.Checkpoint on the tf.data iterator), so an
interrupted run continues with the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gin
import numpy as np
import seqio
import tensorflow as tf

from dss_jax import batching
from dss_jax.batching import Repacker
from dss_jax.tasks import metrics, preprocessors, readers, registry, sources

# Traces without AutoGraph. Our preprocessors and seqio's reading, tokenizing and unpacked conversion are plain TF
# ops, so AutoGraph's source-to-source conversion of every mapped function (and each function it calls) finds nothing
# to rewrite, yet costs a toy dss-train run ~6 of its ~50 s. seqio's packing iterates over tensors in Python and keeps
# AutoGraph. Python control flow on a tensor fails loudly without it, never silently.
_plain_tf = tf.autograph.experimental.do_not_convert


class DssEncDecFeatureConverter(seqio.EncDecFeatureConverter):
    """seqio's EncDecFeatureConverter plus the per-token task id of every target token, and loss weights scaled
    by the per-token ``targets_weight`` (integers: 1, or lcm-scaled for several rationales per input)."""

    TASK_FEATURES = {
        **seqio.EncDecFeatureConverter.TASK_FEATURES,
        "targets_task": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "targets_weight": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }
    MODEL_FEATURES = {
        **seqio.EncDecFeatureConverter.MODEL_FEATURES,
        "decoder_task_ids": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }

    def _convert_example(self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
        d = dict(super()._convert_example(features))
        d["decoder_task_ids"] = features["targets_task"]
        d["decoder_loss_weights"] = d["decoder_loss_weights"] * features["targets_weight"]
        return d

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
        lengths["decoder_task_ids"] = task_feature_lengths["targets"]
        return lengths


def feature_lengths(inputs_length: int, targets_length: int) -> dict[str, int]:
    return {"inputs": inputs_length, "targets": targets_length, "targets_task": targets_length, "targets_weight": targets_length}


class BatchIterator:
    """numpy batches from a tf.data pipeline; ``save``/``restore`` checkpoint its exact position.

    The position is tf.train.Checkpoint's files of the iterator, each gzipped (``PATH.index.gz``,
    ``PATH.data-00000-of-00001.gz``): tf.data writes every slot of a shuffle buffer, filled or not, and the rows
    it holds, all highly redundant (a 100k-slot buffer over 180 rows: 34.7 MB raw, 1.1 MB gzipped). States written
    before, uncompressed, are read as they are.
    """

    def __init__(self, ds: tf.data.Dataset):
        self._ds = ds
        self._it = iter(ds)
        self._ckpt = tf.train.Checkpoint(ds=self._it)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in next(self._it).items()}

    def save(self, path: str) -> None:
        directory, name = os.path.split(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=name + "_tmp-") as tmp:  # pruned with the step if left
            self._ckpt.write(os.path.join(tmp, name))
            for f in sorted(os.listdir(tmp)):
                with open(os.path.join(tmp, f), "rb") as src, gzip.open(os.path.join(tmp, f + ".gz"), "wb", 1) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            for f in sorted(os.listdir(tmp)):
                if f.endswith(".gz"):
                    os.replace(os.path.join(tmp, f), os.path.join(directory, f))

    def restore(self, path: str) -> None:
        directory, name = os.path.split(os.path.abspath(path))
        if not os.path.exists(os.path.join(directory, name + ".index.gz")):
            self._ckpt.read(path).assert_consumed()  # uncompressed (written before compression)
            return
        with tempfile.TemporaryDirectory(dir=directory, prefix=name + "_tmp-") as tmp:  # pruned with the step if left
            for f in os.listdir(directory):
                if f.startswith(name + ".") and f.endswith(".gz"):
                    with gzip.open(os.path.join(directory, f), "rb") as src, open(os.path.join(tmp, f[:-3]), "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
            self._ckpt.read(os.path.join(tmp, name)).assert_consumed()


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
    max_examples: int | None = None,
) -> tf.data.Dataset:
    """Converted and batched dataset of a registered task or mixture (this process's shard only)."""
    # The paired DSS tasks shuffle inputs in their source, keeping each input's two targets adjacent.
    shuffle_examples = shuffle and not registry.shuffles_in_source(name)
    lengths = feature_lengths(inputs_length, targets_length)
    converter = DssEncDecFeatureConverter(pack=pack)
    shard = seqio.ShardInfo(shard_id, num_shards)
    provider = seqio.get_mixture_or_task(name)
    ds = _plain_tf(provider.get_dataset)(
        lengths,
        split=split,
        shuffle=shuffle_examples,
        seed=seed,
        shard_info=shard,
        num_epochs=num_epochs,
        # part of a split: seqio's in-memory cache of small splits would be abandoned half-read (TensorFlow warns)
        try_in_mem_cache=not max_examples,
    )
    ds = (converter if pack else _plain_tf(converter))(ds, task_feature_lengths=lengths)
    ds = ds.take(max_examples) if max_examples else ds
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(2)


def train_batches(
    name: str,
    inputs_length: int,
    targets_length: int,
    batch_size: int,
    pack: bool,
    seed: int,
    shard_id: int = 0,
    num_shards: int = 1,
) -> BatchIterator:
    ds = get_dataset(name, "train", inputs_length, targets_length, batch_size, pack, True, seed, None, shard_id, num_shards)
    return BatchIterator(ds)


def eval_examples(name: str, split: str) -> list[dict]:
    """The un-converted eval examples (text and tokens) of a task split, in order."""
    task = seqio.get_mixture_or_task(name)
    ds = _plain_tf(task.get_dataset)(None, split=split, shuffle=False, num_epochs=1)
    return list(ds.as_numpy_iterator())


DATA_SPEC_FIELDS = (
    "benchmark",
    "method",
    "label_source",
    "mixing",
    "inputs_length",
    "targets_length",
    "user_train_file",
    "user_validation_file",
    "user_test_file",
)


@gin.configurable
@dataclasses.dataclass
class SeqioData:
    """The default data source of ``dss-train``: registers a benchmark's (or a user's) tasks with the run's
    vocabulary and serves the training task's batches and the evaluation sets.

    ``batching`` ("padded", "bucketed", "packed"; ``dss_jax.batching``) removes the padding of unpacked training
    batches while keeping exactly the examples of each step; it needs ``pack=False``.

    Evaluation sets: ``eval_task`` (label accuracy and loss, human labels) and, for DSS, the rationale task
    (rationale loss), on the validation or test split; unpacked, so each row is one example.
    ``rank_classification``: also score multiple-choice tasks (CQA's listed choices, the NLI classes) by ranking
    each candidate label by the model's likelihood, as seqio's rank classification does (``rank_accuracy``).
    """

    benchmark: str = "cqa"
    method: str = "dss"
    label_source: str = "gold"
    mixing: str = "objective"
    vocabulary: seqio.Vocabulary = gin.REQUIRED
    inputs_length: int = 1024
    targets_length: int = 256
    pack: bool = True
    batching: str = "padded"
    user_train_file: str | None = None
    user_validation_file: str | None = None
    user_test_file: str | None = None
    max_eval_examples: int | None = None
    rank_classification: bool = False
    options: registry.DataOptions = dataclasses.field(default_factory=registry.DataOptions)
    # the selection task's unconverted examples per split, read once (rank classification and scoring both use them)
    _examples: dict[str, list[dict]] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    # eval batches per (split, batch size, shard, shards, limit), built once: the end-of-run table reads validation again
    _eval_sets: dict[tuple, dict[str, list[dict[str, np.ndarray]]]] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # where the registered tasks' rows come from (split sizes, baselines, the metric's benchmark)
    _source: sources.Source = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.batching not in batching.MODES:
            raise ValueError(f"SeqioData.batching={self.batching!r}; expected one of {batching.MODES}")
        if self.batching != "padded" and self.pack:
            raise ValueError(
                f"SeqioData.batching={self.batching!r} removes padding from unpacked rows: set SeqioData.pack=False "
                "(seqio's packing changes how many inputs a step holds)"
            )
        if self.user_train_file:
            names = registry.register_user_data(
                self.benchmark,
                self.vocabulary,
                self.user_train_file,
                self.user_validation_file,
                self.user_test_file,
                options=self.options,
            )
        else:
            names = registry.register_benchmark(self.benchmark, self.vocabulary, options=self.options)
        self._source = registry.origin(names[0])
        splits = self.source.splits
        if "train" not in splits:
            where = self.source.data_dir or self.user_train_file
            raise FileNotFoundError(
                f"{self.benchmark}: no training split in {where} (splits there: {', '.join(splits) or 'none'}); "
                "get the benchmark's files from the paper's repository (google-research/distilling-step-by-step)"
            )
        if self.user_train_file and (self.method != "finetune" or self.label_source == "llm"):
            self._check_teacher_outputs()
        self.task = registry.task_name(self.benchmark, self.method, self.label_source, self.mixing)
        self.selection_task = registry.eval_task_name(self.benchmark, self.method)
        self.eval_tasks = [self.selection_task] + ([f"{self.benchmark}_rationale"] if self.method == "dss" else [])

    def _check_teacher_outputs(self) -> None:
        """Methods that learn from the teacher need its rationales (DSS, single-task) or labels (distillation)."""
        assert self.user_train_file is not None  # only user data has a train file to check
        train = readers.read_user_jsonl(self.user_train_file)
        field = "llm_label" if self.method == "distill" or self.label_source == "llm" else "rationale"
        if not any(getattr(e, field) for e in train):
            raise ValueError(
                f"{self.user_train_file}: none of its {len(train)} rows has a {field!r}, which method "
                f"{self.method!r} learns from. Add the teacher's rationales and labels (e.g. with dss-teacher), or train "
                "on the labels alone with runs/finetune.gin (method 'finetune')"
            )

    @property
    def vocabulary_file(self) -> str:
        return self.vocabulary.sentencepiece_model_file

    def inference_format(self) -> dict:
        """How raw inputs become model inputs at inference (dss-infer reads this from the model dir)."""
        label_prefix = "predict: " if self.method == "dss" else ""
        return {
            "method": self.method,
            "label_prefix": label_prefix,
            "rationale_prefix": "explain: " if self.method == "dss" else None,
            "single_task_separator": preprocessors.SINGLE_TASK_SEPARATOR.strip() if self.method == "single_task" else None,
            "inputs_length": self.inputs_length,
            "targets_length": self.targets_length,
            "eval_task": self.selection_task,
            "data": self.data_spec(),
        }

    def data_spec(self) -> dict:
        """The fields that identify this data, as plain JSON: dss-eval rebuilds the data from them (and the
        model dir's spiece.model) without executing anything in the model dir."""
        spec = {k: getattr(self, k) for k in DATA_SPEC_FIELDS}
        for k in ("user_train_file", "user_validation_file", "user_test_file"):
            spec[k] = str(Path(spec[k]).resolve()) if spec[k] else None
        spec["options"] = dataclasses.asdict(self.options)
        return spec

    @classmethod
    def from_spec(cls, spec: dict, vocabulary: seqio.Vocabulary, **overrides: Any) -> SeqioData:
        """The inverse of :meth:`data_spec`; every value is checked to be a plain string, number or null."""
        spec = dict(spec)
        options = spec.pop("options", {})  # model dirs written before the data options were recorded: defaults
        fields = {f.name for f in dataclasses.fields(registry.DataOptions)}
        plain = (str, int, float, type(None))
        bad = [k for k, v in spec.items() if k not in DATA_SPEC_FIELDS or not isinstance(v, plain)]
        bad += [
            f"options.{k}"
            for k, v in (options if isinstance(options, dict) else {"?": None}).items()
            if k not in fields or not isinstance(v, plain)
        ]
        if bad:
            raise ValueError(f"data spec: unexpected field or value for {', '.join(sorted(bad))}")
        return cls(**spec, vocabulary=vocabulary, pack=False, options=registry.DataOptions(**options), **overrides)

    def train_iterator(self, batch_size: int, seed: int, shard_id: int, num_shards: int) -> BatchIterator:
        return train_batches(
            self.task, self.inputs_length, self.targets_length, batch_size, self.pack, seed, shard_id, num_shards
        )

    def repacker(self, rows_multiple: int) -> Repacker | None:
        """Removes padding from each training batch (``batching``); None when the batches stay padded."""
        if self.batching == "padded":
            return None
        return batching.Repacker(self.batching, self.inputs_length, self.targets_length, rows_multiple=rows_multiple)

    @property
    def source(self) -> sources.Source:
        return self._source

    @property
    def needs_decoding(self) -> bool:
        """True when the task's metric is not exact match of the label text (SVAMP: equation value)."""
        return metrics.needs_decoding(self.source.benchmark)

    def split_size(self, split: str) -> int:
        return len(self.source.examples(split)) if split in self.source.splits else 0

    def baselines(self, split: str) -> dict[str, float]:
        from dss_jax.tasks import baselines

        return baselines.baselines(self.source.benchmark, self.source.examples("train"), self.source.examples(split))

    def candidate_labels(self, split: str, n: int) -> list[list[str]] | None:
        """The first ``n`` examples' candidate labels for rank classification (None: no closed label set)."""
        from dss_jax.tasks import baselines

        out = []
        for e in self.selection_examples(split)[:n]:
            labels = baselines.candidate_labels(self.source.benchmark, e["inputs_pretokenized"].decode("utf-8", "replace"))
            if labels is None:
                return None
            out.append(labels)
        return out

    def selection_examples(self, split: str) -> list[dict]:
        """The selection task's unconverted examples of ``split``, in order (read once per split)."""
        if split not in self._examples:
            self._examples[split] = eval_examples(self.selection_task, split)
        return self._examples[split]

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Target texts -> token ids through EOS, as the label task's targets are tokenized."""
        return [list(self.vocabulary.encode(t)) + [self.vocabulary.eos_id] for t in texts]

    def detokenize(self, rows: list[list[int]]) -> list[str]:
        """Output ids (cut before EOS by ``decoding.decode_and_cut``) -> text; pad and ids past the vocabulary
        (a model's vocabulary may be padded) decode to nothing."""
        size = self.vocabulary.vocab_size
        return [self.vocabulary.decode([t for t in row if 0 < t < size]) for row in rows]

    def score(self, split: str, predictions: list[str]) -> dict[str, float]:
        """The task's own metric (and the listed-choice share for multiple choice) of decoded label texts, in the
        order of the selection task's unshuffled examples (the first ``len(predictions)`` of the split)."""
        from dss_jax.tasks import baselines

        examples = self.selection_examples(split)[: len(predictions)]
        task = seqio.get_mixture_or_task(self.selection_task)
        targets = [metrics.postprocess_label(e["targets_pretokenized"], e, is_target=True) for e in examples]
        preds = [metrics.postprocess_label(p) for p in predictions]
        out: dict[str, float] = {}
        for fn in task.metric_fns:
            out.update(fn(targets, preds))
        inputs = [e["inputs_pretokenized"].decode("utf-8", errors="replace") for e in examples]
        share = baselines.listed_choice_share(self.source.benchmark, inputs, preds)
        if share is not None:
            out["listed_choice_share"] = share
        return out

    def eval_sets(
        self, split: str, batch_size: int, shard_id: int, num_shards: int, max_examples: int | None = -1
    ) -> dict[str, list[dict[str, np.ndarray]]]:
        """Unpacked eval batches per eval task. ``max_examples=-1``: ``max_eval_examples`` on validation and the
        whole split otherwise (the test split is always scored in full)."""
        if max_examples == -1:
            max_examples = self.max_eval_examples if split == "validation" else None
        key = (split, batch_size, shard_id, num_shards, max_examples)
        if key in self._eval_sets:
            return self._eval_sets[key]
        out = {}
        for name in self.eval_tasks:
            if split not in seqio.get_mixture_or_task(name).splits:
                continue
            ds = get_dataset(
                name,
                split,
                self.inputs_length,
                self.targets_length,
                batch_size,
                pack=False,
                shuffle=False,
                seed=None,
                num_epochs=1,
                shard_id=shard_id,
                num_shards=num_shards,
                drop_remainder=False,
                max_examples=max_examples,
            )
            out[name] = [{k: v.numpy() for k, v in b.items()} for b in ds]
        self._eval_sets[key] = out
        return out
