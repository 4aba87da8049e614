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
single_task) is recorded at registration on the task itself (:class:`DssTask`), never read back from its name.
Which training data (fraction, unparsed completions, rationale quality) is a :class:`DataOptions` passed in at
registration (the run gins bind ``SeqioData.options = @registry.DataOptions()``).

This module registers; the jobs it composes live beside it: ``sources`` (where rows come from and which train),
``preprocessors`` (text and tokens), ``metrics`` (scoring). The only registry is seqio's own (a process-wide
table keyed by task name, which seqio's ``get_mixture_or_task`` reads); nothing else here is global state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import gin
import seqio
import tensorflow as tf

from dss_jax.losses import LABEL_TASK_ID, RATIONALE_TASK_ID
from dss_jax.tasks import metrics, preprocessors, quality, sources

TASK_IDS = {"label": LABEL_TASK_ID, "rationale": RATIONALE_TASK_ID}
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
        quality.check_options(self.rationale_filter, self.max_rationale_tokens, self.rationales_per_input)
        if self.on_parse_failure not in ("keep", "drop"):
            raise ValueError(f"DataOptions.on_parse_failure must be 'keep' or 'drop', got {self.on_parse_failure!r}")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"DataOptions.train_fraction must be in (0, 1], got {self.train_fraction}")


@gin.configurable
def mixture_rate(task: DssTask | None = None, a: float = 0.5) -> float:
    """Rate of a task in a ``*_rates`` mixture: a for the label task, 1 - a for the rationale task."""
    if not 0 <= a <= 1:
        raise ValueError(f"mixture_rate.a must be in [0, 1], got {a}")
    if task is None:
        return a
    return a if task.kind == "label" else 1.0 - a


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


class DssTask(seqio.Task):
    """A seqio task that knows its kind (label, rationale, paired, single_task) and where its rows come from,
    both set at registration: the mixture rates, the pipeline's shuffle and ``SeqioData`` (split sizes,
    baselines) read them from the registered task."""

    def __init__(self, name: str, *args: Any, kind: str, origin: sources.Source, **kwargs: Any):
        super().__init__(name, *args, **kwargs)
        self.kind = kind
        self.origin = origin


def origin(name: str) -> sources.Source:
    """Where a registered task's rows come from (its benchmark or user files)."""
    task = seqio.get_mixture_or_task(name)
    if not isinstance(task, DssTask):
        raise ValueError(f"{name!r} is not a task registered by dss_jax.tasks.registry")
    return task.origin


def shuffles_in_source(name: str) -> bool:
    """True for the paired DSS tasks, which shuffle their inputs in the source: read them with shuffle=False."""
    task = seqio.get_mixture_or_task(name)
    return isinstance(task, DssTask) and task.kind == "paired"


def _add_task(
    name: str,
    kind: str,
    needs_teacher: bool,
    source: sources.Source,
    vocabulary: seqio.Vocabulary,
    steps: list,
    opts: DataOptions,
    table: sources.RationaleTable | None,
) -> None:
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        task_cls=DssTask,
        kind=kind,
        origin=source,
        source=seqio.FunctionDataSource(
            functools.partial(sources.dataset_fn, source, opts, kind, needs_teacher, table), splits=source.splits
        ),
        shuffle_buffer_size=None if kind == "paired" else seqio.dataset_providers.SHUFFLE_BUFFER_SIZE,
        preprocessors=steps,
        output_features=preprocessors.output_features(vocabulary),
        postprocess_fn=metrics.postprocess_label,
        metric_fns=metrics.metric_fns_for(source.benchmark),
    )


def register_source(source: sources.Source, vocabulary: seqio.Vocabulary, *, options: DataOptions) -> list[str]:
    """Registers every task and mixture of one benchmark or user dataset; returns their names."""
    b = source.name
    names = []
    selective = options.rationale_filter != "all" or options.max_rationale_tokens or options.rationales_per_input > 1
    table = sources.RationaleTable.build(source, options, vocabulary) if selective and "train" in source.splits else None

    def add(name: str, kind: str, prefix: str, label_key: str, task_id: int, needs_teacher: bool) -> None:
        pre = [seqio.map_over_dataset(preprocessors.format_fn(kind, prefix, label_key)), *preprocessors.tail(task_id)]
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
            return ds.flat_map(functools.partial(preprocessors.pair_rows, label_key=key))

        name = f"{b}_dss_{src}"
        _add_task(name, "paired", True, source, vocabulary, [flat_pairs, *preprocessors.tail(LABEL_TASK_ID)], options, table)
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
    return register_source(sources.benchmark_source(benchmark, data_dir), vocabulary, options=options)


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
    return register_source(sources.user_source(name, train_file, validation_file, test_file), vocabulary, options=options)
