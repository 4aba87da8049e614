"""What ``dss-train`` fixes before the first step: the checks of its bindings (made before anything is written),
the model dir and its run files, the training iterator, and the run's parts that the loop reads (``Run``,
``LoopState``, ``Schedule``)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gin
import jax
import orbax.checkpoint as ocp

from dss_jax import batching, checkpoints, evaluators, partitioning, trainer
from dss_jax.data_source import DataSource
from dss_jax.model import ModelConfig


class NonFiniteLossError(RuntimeError):
    """A step's loss, gradient norm or updated parameters are not finite: the run stops before saving that state."""


def write_run_files(model_dir: Path, model_config: ModelConfig, data: DataSource) -> None:
    """What the eval and infer binaries need beside the checkpoints: gin config, model config, vocabulary,
    and the input format (task prefixes, lengths)."""
    (model_dir / "config.gin").write_text(gin.config_str())
    (model_dir / checkpoints.CONFIG_FILE).write_text(
        json.dumps(model_config.replace(scan_layers=False).to_dict(), indent=2) + "\n"
    )
    spm = data.vocabulary_file
    if spm and Path(spm).resolve() != (model_dir / "spiece.model").resolve():
        shutil.copy(spm, model_dir / "spiece.model")
    (model_dir / "inference.json").write_text(json.dumps(data.inference_format(), indent=2) + "\n")


def local_rows_multiple(bsharding: Any, microbatches: int, nproc: int) -> int:
    """Rows a process's batch must be a multiple of, so the global batch splits over devices and microbatches."""
    dp = math.prod(bsharding.mesh.shape[a] for a in ("data", "fsdp"))
    return max(1, dp * microbatches // nproc)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When the loop logs, evaluates and saves, in steps (``every`` 0: never; the last step always saves)."""

    num_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int


def due(step: int, every: int, total: int) -> bool:
    """True at the multiples of ``every`` and at the last step; never when ``every`` is 0."""
    return every > 0 and (step % every == 0 or step == total)


@dataclasses.dataclass(frozen=True)
class Run:
    """What setup builds once and the loop and the final test read: the run's fixed parts."""

    model_dir: Path
    model_config: ModelConfig
    data: DataSource
    mesh: Any
    bsharding: Any
    layout: trainer.StateLayout
    step_fn: Callable
    eval_fn: Callable
    manager: ocp.CheckpointManager
    train_iter: Any
    local_batch: int
    validation: evaluators.SplitEvaluators | None  # None: no evaluation during training
    on_nonfinite: str

    @property
    def metric_key(self) -> str:
        return f"{self.data.selection_task}/accuracy"

    def split_evaluators(
        self, split: str, max_examples: int | None = -1, decode_always: bool = False
    ) -> evaluators.SplitEvaluators:
        placement = evaluators.Placement(self.local_batch, self.bsharding)
        cfg = partitioning.for_mesh(self.model_config, self.mesh)  # decoding's encoder pass splits rows too
        return evaluators.build(
            self.data, cfg, self.eval_fn, split, placement, max_examples=max_examples, decode_always=decode_always
        )


@dataclasses.dataclass
class LoopState:
    """What the loop carries from step to step, passed explicitly to the functions that read or update it."""

    state: trainer.TrainState
    saved_step: int  # the newest committed checkpoint; -1: none
    nonfinite: Any = None  # trainer.track_nonfinite: [first non-finite step, its flags, count]
    first_train: dict[str, float] = dataclasses.field(default_factory=dict)
    last_train: dict[str, float] = dataclasses.field(default_factory=dict)
    last_eval: dict[str, float] = dataclasses.field(default_factory=dict)
    skipped_logged: int = 0
    stopped_at: int | None = None

    def __post_init__(self) -> None:
        if self.nonfinite is None:
            self.nonfinite = jax.numpy.zeros((3,), jax.numpy.int32)


def make_model_dir(model_dir: Path) -> None:
    """Makes the model dir (and its parents), or a ValueError saying why it cannot be one."""
    if model_dir.exists() and not model_dir.is_dir():
        raise ValueError(f"--model_dir={model_dir} is a file, not a directory: give a directory (it is made if missing)")
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--model_dir={model_dir} cannot be made ({e.strerror}: {e.filename})") from None


def check_schedule(num_steps: int, eval_every: int, checkpoint_every: int, keep_checkpoints: int, log_every: int) -> None:
    """A ValueError naming the first binding out of range: steps and counts are at least 1, intervals at least 0."""
    for name, value, low in (
        ("num_steps", num_steps, 1),
        ("keep_checkpoints", keep_checkpoints, 1),
        ("eval_every", eval_every, 0),
        ("checkpoint_every", checkpoint_every, 0),
        ("log_every", log_every, 0),
    ):
        if value < low:
            raise ValueError(f"train.train.{name}={value}: must be {low} or more")


def check_mesh(batch_size: int, mesh_config: partitioning.MeshConfig | None) -> None:
    """The batch must split over the mesh's data x fsdp devices (checked before anything is written)."""
    mesh_config = mesh_config or partitioning.MeshConfig()
    mesh = partitioning.make_mesh(mesh_config)
    dp = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    if batch_size % dp:
        raise ValueError(f"train.train.batch_size={batch_size} must divide by the mesh's data x fsdp size ({dp})")


def check_sizes(batch_size: int, microbatches: int, input_shards: int | None, on_nonfinite: str) -> tuple[int, int]:
    """(rows per process, input shards per process), or a ValueError naming the binding."""
    nproc = jax.process_count()
    for name, value in (("batch_size", batch_size), ("microbatches", microbatches), ("input_shards", input_shards or 1)):
        if value < 1:
            raise ValueError(f"train.train.{name}={value}: must be 1 or more")
    if batch_size % (nproc * microbatches):
        raise ValueError(
            f"train.train.batch_size={batch_size} must divide by processes ({nproc}) x microbatches ({microbatches})"
        )
    local_batch = batch_size // nproc
    shards = input_shards or nproc
    if shards % nproc or local_batch % (shards // nproc):
        raise ValueError(
            f"train.train.input_shards={shards} must be a multiple of the processes ({nproc}) and divide the local batch"
        )
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"train.train.on_nonfinite={on_nonfinite!r}: expected 'stop' or 'skip'")
    return local_batch, shards // nproc


def check_rng_impl(rng_impl: str) -> None:
    if rng_impl not in trainer.RNG_IMPLS:
        raise ValueError(f"train.train.rng_impl={rng_impl!r}: expected one of {', '.join(trainer.RNG_IMPLS)}")


def train_iterator(data: DataSource, local_batch: int, per_process: int, seed: int, rows_multiple: int) -> Any:
    """This process's training batches: its input shards side by side, each repacked on its own when the data
    asks for it (at rows a multiple of ``rows_multiple`` over the shards, as the processes that could read them
    would)."""
    first = jax.process_index() * per_process
    shards = per_process * jax.process_count()
    it = batching.ShardedIterator(
        [data.train_iterator(local_batch // per_process, seed, s, shards) for s in range(first, first + per_process)]
    )
    # every shard gets the same row count (the agreed shape), so per-shard multiples add up to the process's
    repacker = data.repacker(rows_multiple // per_process if rows_multiple % per_process == 0 else rows_multiple)
    return batching.RepackingIterator(it, repacker) if repacker is not None else it
