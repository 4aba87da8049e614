"""The tasks' seqio preprocessors: raw rows -> prefixed text inputs and targets -> tokens, task ids and weights.

A label example reads ``predict: x`` (or ``x`` without a prefix), a rationale example ``explain: x``, a single-task
example's target is ``rationale So the answer is label``; a non-empty ``input_b`` (the NLI hypothesis) is joined to
the tokenized inputs by EOS. ``targets_task`` carries each target token's task id (1 label, 2 rationale) and
``targets_weight`` its loss weight, which packing keeps aligned.
"""

from __future__ import annotations

from collections.abc import Callable

import seqio
import tensorflow as tf

from dss_jax.losses import LABEL_TASK_ID, RATIONALE_TASK_ID
from dss_jax.tasks import sources

SINGLE_TASK_SEPARATOR = " So the answer is "


def format_fn(kind: str, prefix: str, label_key: str) -> Callable[[dict], dict]:
    """Map raw rows to text ``inputs``/``input_b``/``targets`` (+ pretokenized copies for metrics)."""

    def fn(ex: dict) -> dict:
        if kind == "single_task":
            targets = tf.strings.join([ex["rationale"], SINGLE_TASK_SEPARATOR, ex[label_key]])
        elif kind == "rationale":
            targets = ex["rationale"]
        else:
            targets = ex[label_key]
        inputs = tf.strings.join([prefix, ex["input"]]) if prefix else ex["input"]
        return {
            "inputs": inputs,
            "input_b": ex["input_b"],
            "targets": targets,
            "inputs_pretokenized": inputs,
            "input_b_pretokenized": ex["input_b"],  # the NLI hypothesis, for predictions files
            "targets_pretokenized": targets,
            "label_pretokenized": ex["label"],
            "idx": ex["idx"],
            "weight": ex["rationale_weight"] if kind == "rationale" else ex["label_weight"],
        }

    return fn


def pair_rows(ex: dict, label_key: str) -> tf.data.Dataset:
    """One input -> its label example, then its rationale example(s) (the paper's objective): none when a data
    option dropped its rationale, several (each weighted 1/k) with ``rationales_per_input``."""
    label = {**format_fn("label", "predict: ", label_key)(ex), "task_id": tf.constant(LABEL_TASK_ID, tf.int32)}
    explain = format_fn("rationale", "explain: ", label_key)
    rationales = sources.rationale_rows(ex).map(lambda r: {**explain(r), "task_id": tf.constant(RATIONALE_TASK_ID, tf.int32)})
    return tf.data.Dataset.from_tensors(label).concatenate(rationales)


@seqio.map_over_dataset
def tokenize_with_segment_b(ex: dict, output_features: seqio.preprocessors.OutputFeaturesType) -> dict:
    """Tokenizes inputs and targets; a non-empty ``input_b`` is joined to the inputs by the EOS id (NLI)."""
    vocab = output_features["inputs"].vocabulary
    inputs = tf.cast(vocab.encode_tf(ex["inputs"]), tf.int32)
    b = tf.cast(vocab.encode_tf(ex["input_b"]), tf.int32)
    eos = tf.constant([vocab.eos_id], tf.int32)
    inputs = tf.cond(tf.size(b) > 0, lambda: tf.concat([inputs, eos, b], 0), lambda: inputs)
    out = {k: v for k, v in ex.items() if k not in ("inputs", "targets", "input_b")}
    out["inputs"] = inputs
    out["targets"] = tf.cast(output_features["targets"].vocabulary.encode_tf(ex["targets"]), tf.int32)
    return out


def add_task_ids(task_id: int) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
    """Per target token: the task id (the row's ``task_id``, else ``task_id``) and the loss weight (``weight``)."""

    @seqio.map_over_dataset
    def fn(ex: dict) -> dict:
        tid = ex.pop("task_id", tf.constant(task_id, tf.int32))
        weight = ex.pop("weight", tf.constant(1, tf.int32))
        ones = tf.ones_like(ex["targets"])
        return {**ex, "targets_task": ones * tf.cast(tid, tf.int32), "targets_weight": ones * tf.cast(weight, tf.int32)}

    return fn


def tail(task_id: int) -> list:
    """The preprocessors every task ends with: tokenize, EOS, task ids and weights."""
    return [tokenize_with_segment_b, seqio.preprocessors.append_eos_after_trim, add_task_ids(task_id)]


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    return {
        "inputs": seqio.Feature(vocabulary, add_eos=True, required=True),
        "targets": seqio.Feature(vocabulary, add_eos=True, required=True),
        "targets_task": seqio.Feature(seqio.PassThroughVocabulary(size=3), add_eos=False, required=False),
        # per-token loss weight (1, or scaled for several rationales per input: tasks/quality.py)
        "targets_weight": seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False, required=False),
    }
