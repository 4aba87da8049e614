"""SeqIO tasks and mixtures for distilling step-by-step, its baselines and ablations.

Per benchmark ``b`` (cqa, svamp, esnli, anli1) or user dataset, with label source ``src`` (gold = human labels,
llm = teacher labels):

=====================  ===========================================  ==================================
name                   inputs -> targets                            used by
=====================  ===========================================  ==================================
b_label_src            ``predict: x`` -> label                      DSS label task; DSS evaluation (gold)
b_rationale            ``explain: x`` -> teacher rationale          DSS rationale task
b_dss_src              both of the above for every input, in the     DSS, the paper's objective (default):
                       same step (task ids 1 and 2)                 a*mean(label) + (1-a)*mean(rationale)
b_dss_src_rates        mixture of b_label_src : b_rationale at       DSS, T5X-style rate ablation
                       rates a : 1-a (gin: ``mixture_rate.a``)      (token-level loss)
b_finetune             x -> human label (no prefix)                 standard finetuning; baselines' eval
b_distill              x -> teacher label (no prefix)               standard distillation
b_single_task_src      x -> "rationale So the answer is label"      the paper's single-task ablation
=====================  ===========================================  ==================================

Every example carries ``targets_task``: the task id (1 label, 2 rationale) on each target token, which
packing keeps aligned, so the trainer can take per-task means. Each task's kind (label, rationale, paired,
single_task) is recorded at registration (``TASK_KINDS``), never read back from its name. Which training data
(fraction, unparsed completions, rationale quality) is a :class:`DataOptions` passed in at registration (the run
gins bind ``SeqioData.options = @registry.DataOptions()``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import gin
import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from dss_jax.losses import LABEL_TASK_ID, RATIONALE_TASK_ID
from dss_jax.tasks import arithmetic, quality, readers, tfds_builder

log = logging.getLogger("dss_jax.data")
TASK_IDS = {"label": LABEL_TASK_ID, "rationale": RATIONALE_TASK_ID}
SINGLE_TASK_SEPARATOR = " So the answer is "
METHODS = ("dss", "finetune", "distill", "single_task")
LABEL_SOURCES = ("gold", "llm")
MIXINGS = ("objective", "rates")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataOptions:
    """Which training data: fraction (deterministic by seed, the same subset for every method), what to do
    with teacher completions that did not parse ('keep': empty rationale/label; 'drop': leave the input out), and
    which rationales train (``tasks/quality.py``: ``rationale_filter``, ``max_rationale_tokens``,
    ``rationales_per_input``)."""

    train_fraction: float = 1.0
    subset_seed: int = 0
    on_parse_failure: str = "keep"
    rationale_filter: str = "all"
    max_rationale_tokens: int | None = None
    rationales_per_input: int = 1

    def __post_init__(self) -> None:
        if self.rationale_filter not in quality.RATIONALE_FILTERS:
            raise ValueError(
                f"DataOptions.rationale_filter={self.rationale_filter!r}; expected one of {quality.RATIONALE_FILTERS}"
            )
        if not 1 <= self.rationales_per_input <= quality.MAX_RATIONALES_PER_INPUT:
            raise ValueError(
                f"DataOptions.rationales_per_input must be in [1, {quality.MAX_RATIONALES_PER_INPUT}], "
                f"got {self.rationales_per_input}"
            )
        if self.max_rationale_tokens is not None and self.max_rationale_tokens < 2:
            raise ValueError(
                f"DataOptions.max_rationale_tokens must be at least 2 (EOS included), got {self.max_rationale_tokens}"
            )
        if self.on_parse_failure not in ("keep", "drop"):
            raise ValueError(f"DataOptions.on_parse_failure must be 'keep' or 'drop', got {self.on_parse_failure!r}")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"DataOptions.train_fraction must be in (0, 1], got {self.train_fraction}")


@gin.configurable
def mixture_rate(task: seqio.Task | None = None, a: float = 0.5) -> float:
    """Rate of a task in a ``*_rates`` mixture: a for the label task, 1 - a for the rationale task."""
    if not 0 <= a <= 1:
        raise ValueError(f"mixture_rate.a must be in [0, 1], got {a}")
    if task is None:
        return a
    return a if TASK_KINDS[task.name] == "label" else 1.0 - a


def task_name(benchmark: str = "cqa", method: str = "dss", label_source: str = "gold", mixing: str = "objective") -> str:
    """The training task or mixture for a method; each argument is one gin override."""
    _check(method=method, label_source=label_source, mixing=mixing)
    if method == "dss":
        return f"{benchmark}_dss_{label_source}" + ("_rates" if mixing == "rates" else "")
    if method == "single_task":
        return f"{benchmark}_single_task_{label_source}"
    return f"{benchmark}_{method}"


def eval_task_name(benchmark: str = "cqa", method: str = "dss") -> str:
    """The task a method is evaluated on: its own input format, always against human labels."""
    _check(method=method)
    return {
        "dss": f"{benchmark}_label_gold",
        "finetune": f"{benchmark}_finetune",
        "distill": f"{benchmark}_finetune",
        "single_task": f"{benchmark}_single_task_gold",
    }[method]


def _check(**kw: str) -> None:
    allowed = {"method": METHODS, "label_source": LABEL_SOURCES, "mixing": MIXINGS}
    for k, v in kw.items():
        if v not in allowed[k]:
            raise ValueError(f"{k}={v!r}; expected one of {allowed[k]}")


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a benchmark's examples come from: the TFDS builder, or a user's JSONL files."""

    name: str
    benchmark: str | None = None
    data_dir: Path | None = None
    user_files: tuple[tuple[str, str], ...] = ()

    @property
    def splits(self) -> list[str]:
        if self.benchmark:
            return readers.available_splits(self.data_dir, self.benchmark)
        return [s for s, _ in self.user_files]

    def examples(self, split: str) -> list[readers.Example]:
        """Python-side rows (for subsets, counts and the dss-data report)."""
        if self.benchmark:
            return readers.read_split(self.data_dir, self.benchmark, split)
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


def select_rationales(
    benchmark: str | None, examples: list[readers.Example], opts: DataOptions, vocabulary: seqio.Vocabulary | None
) -> tuple[np.ndarray, list[tuple[str, ...]], dict[str, int]]:
    """Which examples' rationales train under ``opts``, their extra rationales, and the counts (``tasks/quality.py``;
    dss-data reports them)."""

    def count_tokens(texts: list[str]) -> list[int]:
        return [len(ids) + 1 for ids in vocabulary.tokenizer.encode(texts)] if texts else []  # +1: EOS

    counter = count_tokens if vocabulary is not None else None
    keep, counts = quality.select_rationales(
        examples,
        opts.rationale_filter,
        opts.max_rationale_tokens,
        lambda gold, llm: quality.label_correct(benchmark, gold, llm),
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


def _mark_rationales(ds: tf.data.Dataset, table: RationaleTable | None) -> tf.data.Dataset:
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


def _rationale_rows(ex: dict) -> tf.data.Dataset:
    """The row once per rationale that trains (``rationale`` set to it): none when a data option dropped it, else
    its own and its extras."""
    texts = tf.concat([[ex["rationale"]], ex["extra_rationales"]], 0)
    k = tf.where(ex["keep_rationale"], 1 + tf.math.count_nonzero(ex["extra_rationales"] != "", dtype=tf.int32), 0)
    return tf.data.Dataset.from_tensor_slices(texts[:k]).map(lambda t: {**ex, "rationale": t})


def _dataset_fn(
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
    ds = _mark_rationales(ds, table if split == "train" else None)
    if kind == "rationale":
        ds = ds.flat_map(_rationale_rows)
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


SOURCE_SHUFFLE_BUFFER = 100_000
# kinds of task: label, rationale, paired (DSS: both targets of each input side by side), single_task
TASK_KINDS: dict[str, str] = {}


def shuffles_in_source(name: str) -> bool:
    """True for the paired DSS tasks, which shuffle their inputs in the source: read them with shuffle=False."""
    return TASK_KINDS.get(name) == "paired"


# ----------------------------------------------------------------------------- preprocessors


def _format(kind: str, prefix: str, label_key: str):
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


def _pair_rows(ex: dict, label_key: str) -> tf.data.Dataset:
    """One input -> its label example, then its rationale example(s) (the paper's objective): none when a data
    option dropped its rationale, several (each weighted 1/k) with ``rationales_per_input``."""
    label = {**_format("label", "predict: ", label_key)(ex), "task_id": tf.constant(LABEL_TASK_ID, tf.int32)}
    explain = _format("rationale", "explain: ", label_key)
    rationales = _rationale_rows(ex).map(lambda r: {**explain(r), "task_id": tf.constant(RATIONALE_TASK_ID, tf.int32)})
    return tf.data.Dataset.from_tensors(label).concatenate(rationales)


@seqio.map_over_dataset
def _tokenize_with_segment_b(ex: dict, output_features: seqio.preprocessors.OutputFeaturesType) -> dict:
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


def _add_task_ids(task_id: int):
    @seqio.map_over_dataset
    def fn(ex: dict) -> dict:
        tid = ex.pop("task_id", tf.constant(task_id, tf.int32))
        weight = ex.pop("weight", tf.constant(1, tf.int32))
        ones = tf.ones_like(ex["targets"])
        return {**ex, "targets_task": ones * tf.cast(tid, tf.int32), "targets_weight": ones * tf.cast(weight, tf.int32)}

    return fn


# ----------------------------------------------------------------------------- metrics


def _extract_single_task_label(text: str) -> str:
    return text.rsplit(SINGLE_TASK_SEPARATOR.strip(), 1)[-1].strip() if text else ""


def postprocess_label(output: str | bytes, example: dict | None = None, is_target: bool = False) -> str:
    """Decoded text -> label text, normalised as the gold labels are at load (``readers.normalize_label``); for
    single-task outputs, the part after 'So the answer is'."""
    if isinstance(output, bytes):
        output = output.decode("utf-8", errors="replace")
    if is_target and example is not None and "label_pretokenized" in example:
        label = example["label_pretokenized"]
        return label.decode("utf-8") if isinstance(label, bytes) else str(label)
    label = _extract_single_task_label(output) if SINGLE_TASK_SEPARATOR.strip() in output else output
    return readers.normalize_label(label)


def accuracy(targets: list[str], predictions: list[str]) -> dict[str, float]:
    """Exact-match accuracy of label text (in percent, as the paper reports)."""
    n = max(1, len(targets))
    return {"accuracy": 100.0 * sum(t.strip() == p.strip() for t, p in zip(targets, predictions, strict=True)) / n}


def equation_accuracy(targets: list[str], predictions: list[str]) -> dict[str, float]:
    """SVAMP: a predicted equation is right when it evaluates (safely) to the target's value."""
    n = max(1, len(targets))
    return {"accuracy": 100.0 * sum(arithmetic.equations_equal(p, t) for t, p in zip(targets, predictions, strict=True)) / n}


def metric_fns_for(benchmark: str | None) -> list:
    return [equation_accuracy] if benchmark == "svamp" else [accuracy]


def teacher_accuracy(benchmark: str | None, examples: list[readers.Example]) -> float | None:
    """Teacher label accuracy against human labels on the examples that have teacher outputs (percent)."""
    t = [e for e in examples if e.has_teacher]
    if not t:
        return None
    fn = metric_fns_for(benchmark)[0]
    return fn([e.label for e in t], [e.llm_label for e in t])["accuracy"]


# ----------------------------------------------------------------------------- registration


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    return {
        "inputs": seqio.Feature(vocabulary, add_eos=True, required=True),
        "targets": seqio.Feature(vocabulary, add_eos=True, required=True),
        "targets_task": seqio.Feature(seqio.PassThroughVocabulary(size=3), add_eos=False, required=False),
        # per-token loss weight (1, or scaled for several rationales per input: tasks/quality.py)
        "targets_weight": seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False, required=False),
    }


def _add_task(
    name: str,
    kind: str,
    needs_teacher: bool,
    source: Source,
    vocabulary: seqio.Vocabulary,
    preprocessors: list,
    opts: DataOptions,
    table: RationaleTable | None,
) -> None:
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    TASK_KINDS[name] = kind
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            functools.partial(_dataset_fn, source, opts, kind, needs_teacher, table), splits=source.splits
        ),
        shuffle_buffer_size=None if kind == "paired" else seqio.dataset_providers.SHUFFLE_BUFFER_SIZE,
        preprocessors=preprocessors,
        output_features=output_features(vocabulary),
        postprocess_fn=postprocess_label,
        metric_fns=metric_fns_for(source.benchmark),
    )


def _tail(task_id: int) -> list:
    return [_tokenize_with_segment_b, seqio.preprocessors.append_eos_after_trim, _add_task_ids(task_id)]


SOURCES: dict[str, Source] = {}  # name -> where its examples come from (for split sizes and baselines)


def register_source(source: Source, vocabulary: seqio.Vocabulary, *, options: DataOptions) -> list[str]:
    """Registers every task and mixture of one benchmark or user dataset; returns their names."""
    b = source.name
    SOURCES[b] = source
    names = []
    selective = options.rationale_filter != "all" or options.max_rationale_tokens or options.rationales_per_input > 1
    table = RationaleTable.build(source, options, vocabulary) if selective and "train" in source.splits else None

    def add(name: str, kind: str, prefix: str, label_key: str, task_id: int, needs_teacher: bool) -> None:
        pre = [seqio.map_over_dataset(_format(kind, prefix, label_key)), *_tail(task_id)]
        _add_task(name, kind, needs_teacher, source, vocabulary, pre, options, table)
        names.append(name)

    add(f"{b}_label_gold", "label", "predict: ", "label", LABEL_TASK_ID, False)
    add(f"{b}_label_llm", "label", "predict: ", "llm_label", LABEL_TASK_ID, True)
    add(f"{b}_rationale", "rationale", "explain: ", "label", RATIONALE_TASK_ID, True)
    add(f"{b}_finetune", "label", "", "label", LABEL_TASK_ID, False)
    add(f"{b}_distill", "label", "", "llm_label", LABEL_TASK_ID, True)
    for src, key in (("gold", "label"), ("llm", "llm_label")):
        add(f"{b}_single_task_{src}", "single_task", "", key, LABEL_TASK_ID, True)

        # The paper's objective: both targets of an input side by side (task ids 1, 2).
        def flat_pairs(ds: tf.data.Dataset, key: str = key) -> tf.data.Dataset:
            return ds.flat_map(functools.partial(_pair_rows, label_key=key))

        name = f"{b}_dss_{src}"
        _add_task(name, "paired", True, source, vocabulary, [flat_pairs, *_tail(LABEL_TASK_ID)], options, table)
        names.append(name)

        mix = f"{b}_dss_{src}_rates"
        if mix in seqio.MixtureRegistry.names():
            seqio.MixtureRegistry.remove(mix)
        seqio.MixtureRegistry.add(mix, [(f"{b}_label_{src}", mixture_rate), (f"{b}_rationale", mixture_rate)])
        names.append(mix)
    return names


@gin.configurable
def register_benchmark(
    benchmark: str, vocabulary: seqio.Vocabulary, data_dir: str | None = None, *, options: DataOptions
) -> list[str]:
    """Registers one of the paper's benchmarks (data from ``data_dir`` or $DSS_DATA_DIR)."""
    if benchmark not in readers.BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {readers.BENCHMARKS} (or use register_user_data)")
    d = Path(data_dir) if data_dir else readers.default_data_dir()
    return register_source(Source(benchmark, benchmark=benchmark, data_dir=d), vocabulary, options=options)


@gin.configurable
def register_user_data(
    name: str,
    vocabulary: seqio.Vocabulary,
    train_file: str,
    validation_file: str | None = None,
    test_file: str | None = None,
    *,
    options: DataOptions,
) -> list[str]:
    """Registers a user's JSONL dataset (fields input, label, optional rationale, llm_label) under ``name``."""
    files = [("train", train_file)]
    files += [("validation", validation_file)] if validation_file else []
    files += [("test", test_file)] if test_file else []
    for _, f in files:
        if not Path(f).exists():
            raise FileNotFoundError(f"register_user_data({name!r}): {f} not found")
    source = Source(name, user_files=tuple(files))
    if not validation_file:  # carved from train, 10% (seed 0), as for the paper's CQA and SVAMP
        source = dataclasses.replace(source, user_files=(*source.user_files[:1], ("validation", ""), *source.user_files[1:]))
    return register_source(source, vocabulary, options=options)
