"""``dss-train``: the gin-configured training loop, with evaluation, checkpoints and exact resume.

    dss-train --gin_file=gin/runs/quickstart.gin --model_dir=/tmp/dss_quickstart [--gin.NAME=VALUE ...]

Model dir layout: ``checkpoints/<step>/`` (Orbax: state + meta), ``data/<step>/process_<i>`` (the data
iterator's position at that step, pruned with its checkpoint), ``metrics.jsonl``, ``tb/`` (TensorBoard),
``config.gin`` (operative config), ``test_metrics.json`` (the test split, scored once, for the checkpoint selected
on validation), ``damaged/`` (checkpoint steps that failed their checksums at resume, moved aside).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import gin
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from dss_jax import (
    batching,
    checkpoints,
    configs,
    losses,
    metrics_log,
    partitioning,
    run_checkpoints,
    run_report,
    scoring,
    trainer,
)
from dss_jax.model import ModelConfig

log = logging.getLogger("dss_jax.train")


class DataSource(Protocol):
    """What the trainer needs from the data layer (``dss_jax.tasks.pipeline.SeqioData`` is the default)."""

    selection_task: str

    def train_iterator(self, batch_size: int, seed: int, shard_id: int, num_shards: int) -> Iterator[dict[str, np.ndarray]]: ...

    def eval_sets(
        self, split: str, batch_size: int, shard_id: int, num_shards: int, max_examples: int | None = -1
    ) -> dict[str, list[dict[str, np.ndarray]]]: ...


class NonFiniteLossError(RuntimeError):
    """A step's loss, gradient norm or updated parameters are not finite: the run stops before saving that state."""


class _StopFlag:
    """Set by SIGTERM/SIGINT: the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handler)

    def _handler(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("signal %d: saving a checkpoint at the end of this step, then exiting", signum)


def write_run_files(model_dir: Path, model_config: ModelConfig, data: DataSource) -> None:
    """What the eval and infer binaries need beside the checkpoints: gin config, model config, vocabulary,
    and the input format (task prefixes, lengths)."""
    import shutil

    (model_dir / "config.gin").write_text(gin.config_str())
    (model_dir / checkpoints.CONFIG_FILE).write_text(
        json.dumps(model_config.replace(scan_layers=False).to_dict(), indent=2) + "\n"
    )
    spm = getattr(data, "vocabulary_file", None)
    if spm and Path(spm).resolve() != (model_dir / "spiece.model").resolve():
        shutil.copy(spm, model_dir / "spiece.model")
    fmt = getattr(data, "inference_format", None)
    if fmt is not None:
        (model_dir / "inference.json").write_text(json.dumps(fmt(), indent=2) + "\n")


def _local_rows_multiple(bsharding: Any, microbatches: int, nproc: int) -> int:
    """Rows a process's batch must be a multiple of, so the global batch splits over devices and microbatches."""
    dp = math.prod(bsharding.mesh.shape[a] for a in ("data", "fsdp"))
    return max(1, dp * microbatches // nproc)


def _pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    n = next(iter(batch.values())).shape[0]
    if n == size:
        return batch
    return {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


def run_eval(eval_fn: Any, params: Any, sets: dict[str, list[dict]], local_batch: int, bsharding: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, batches in sets.items():
        sums: dict[str, float] = {}
        for b in batches:
            m = jax.device_get(eval_fn(params, partitioning.global_batch(_pad_batch(b, local_batch), bsharding)))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        out.update({f"{name}/{k}": v for k, v in trainer.summarize_eval(sums).items()})
    return out


def _equalize(sets: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Every process must run the same number of eval steps: pad shorter lists with empty batches."""
    if jax.process_count() == 1:
        return sets
    from jax.experimental import multihost_utils

    out = {}
    for name, batches in sorted(sets.items()):
        n = int(np.max(multihost_utils.process_allgather(np.array(len(batches)))))
        empty = {k: np.zeros_like(v) for k, v in batches[0].items()} if batches else None
        out[name] = batches + [empty] * (n - len(batches))
    return out


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
    eval_sets: dict[str, list[dict]]
    on_nonfinite: str

    @property
    def metric_key(self) -> str:
        return f"{self.data.selection_task}/accuracy"


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


# Configurables that train() itself calls when their gin binding is missing (checked again before the first step).
CALLED_LATER = ("partitioning.MeshConfig", "losses.LossConfig", "registry.mixture_rate")


@gin.configurable(denylist=["model_dir"])
def train(
    model_dir: str,
    model_config: ModelConfig = gin.REQUIRED,
    data: DataSource = gin.REQUIRED,
    optimizer: optax.GradientTransformation = gin.REQUIRED,
    num_steps: int = 10_000,
    batch_size: int = 64,
    microbatches: int = 1,
    seed: int = 0,
    init_checkpoint: str | None = None,
    eval_every: int = 500,
    checkpoint_every: int = 500,
    keep_checkpoints: int = 2,
    log_every: int = 50,
    async_checkpoints: bool = True,
    evaluate_test: bool = True,
    mesh_config: partitioning.MeshConfig | None = None,
    loss_config: losses.LossConfig | None = None,
    progress: bool = True,
    input_shards: int | None = None,
    report_train_examples: int = 1000,
    on_nonfinite: str = "stop",
) -> dict[str, Any]:
    """Trains ``model_config`` on ``data`` with ``optimizer`` for ``num_steps`` steps of ``batch_size`` sequences.

    Resumes from the newest intact checkpoint in ``model_dir``, else starts from ``init_checkpoint`` (parameters
    only) or from scratch; ``on_nonfinite`` stops the run at a non-finite step, or skips (and counts) its update.
    Returns the summary (``summary.json``): the checkpoint selected on validation scored on a train subset
    (``report_train_examples``), validation and test. ``input_shards``: training-data shards (default: processes).
    """
    model_dir_path = Path(model_dir).resolve()
    # the configuration is checked before the model dir is made or locked: a bad value leaves nothing behind
    _check_sizes(batch_size, microbatches, input_shards, on_nonfinite)
    _check_schedule(num_steps, eval_every, checkpoint_every, keep_checkpoints, log_every)
    _check_mesh(batch_size, mesh_config)
    configs.check_bindings_read("dss-train", pending=CALLED_LATER)  # a binding nothing reads (checked again below)
    _make_model_dir(model_dir_path)
    with run_checkpoints.exclusive(model_dir_path):  # one writer per model dir, until this run ends or dies
        run, loop = setup(
            model_dir_path,
            model_config,
            data,
            optimizer,
            batch_size=batch_size,
            microbatches=microbatches,
            seed=seed,
            init_checkpoint=init_checkpoint,
            eval_every=eval_every,
            keep_checkpoints=keep_checkpoints,
            async_checkpoints=async_checkpoints,
            mesh_config=mesh_config,
            loss_config=loss_config,
            input_shards=input_shards,
            on_nonfinite=on_nonfinite,
        )
        configs.check_bindings_read("dss-train")  # everything is built: every binding has been read by now, or never is
        writer = metrics_log.MetricsWriter(run.model_dir, int(jax.device_get(loop.state.step)))
        train_loop(run, Schedule(num_steps, log_every, eval_every, checkpoint_every), loop, writer, progress)
        if loop.stopped_at is not None:
            return {"stopped_at": loop.stopped_at}
        summary = _summary(run, num_steps, loop)
        if evaluate_test and summary["best_step"] is not None:
            summary.update(test_on_best(run, summary["best_step"], report_train_examples))
        if jax.process_index() == 0:
            run_report.plot_losses(run.model_dir)
            (run.model_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        writer.close()
        run.manager.close()
    return summary


def _make_model_dir(model_dir: Path) -> None:
    """Makes the model dir (and its parents), or a ValueError saying why it cannot be one."""
    if model_dir.exists() and not model_dir.is_dir():
        raise ValueError(f"--model_dir={model_dir} is a file, not a directory: give a directory (it is made if missing)")
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--model_dir={model_dir} cannot be made ({e.strerror}: {e.filename})") from None


def _check_schedule(num_steps: int, eval_every: int, checkpoint_every: int, keep_checkpoints: int, log_every: int) -> None:
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


def _check_mesh(batch_size: int, mesh_config: partitioning.MeshConfig | None) -> None:
    """The batch must split over the mesh's data x fsdp devices (checked before anything is written)."""
    mesh_config = mesh_config or partitioning.MeshConfig()
    mesh = partitioning.make_mesh(mesh_config)
    dp = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    if batch_size % dp:
        raise ValueError(f"train.train.batch_size={batch_size} must divide by the mesh's data x fsdp size ({dp})")


def _check_sizes(batch_size: int, microbatches: int, input_shards: int | None, on_nonfinite: str) -> tuple[int, int]:
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


def _train_iterator(data: DataSource, local_batch: int, per_process: int, seed: int, rows_multiple: int) -> Any:
    """This process's training batches: its input shards side by side, repacked when the data asks for it."""
    first = jax.process_index() * per_process
    shards = per_process * jax.process_count()
    it: Any = batching.ShardedIterator(
        [data.train_iterator(local_batch // per_process, seed, s, shards) for s in range(first, first + per_process)]
    )
    repacker = data.repacker(rows_multiple) if hasattr(data, "repacker") else None
    return batching.RepackingIterator(it, repacker) if repacker is not None else it


def _initial_state(run: Run, tx: optax.GradientTransformation, seed: int, init_checkpoint: str | None) -> LoopState:
    """The newest intact checkpoint's state (and data position), else ``init_checkpoint``'s parameters, else new."""
    resumed = run_checkpoints.resume(run.manager, run.model_dir, run.layout, run.train_iter)
    if resumed is not None:
        log.info("resumed from %s at step %d", run.model_dir / "checkpoints", resumed[1])
        return LoopState(state=resumed[0], saved_step=resumed[1])
    params = None
    if init_checkpoint:
        params = checkpoints.load_pretrained(init_checkpoint, run.model_config)[0]
        log.info("initialized parameters from %s", init_checkpoint)
    return LoopState(state=trainer.init_state(run.model_config, tx, run.layout, seed, params), saved_step=-1)


def setup(
    model_dir: Path,
    model_config: ModelConfig,
    data: DataSource,
    tx: optax.GradientTransformation,
    *,
    batch_size: int,
    microbatches: int,
    seed: int,
    init_checkpoint: str | None,
    eval_every: int,
    keep_checkpoints: int,
    async_checkpoints: bool,
    mesh_config: partitioning.MeshConfig | None,
    loss_config: losses.LossConfig | None,
    input_shards: int | None,
    on_nonfinite: str,
) -> tuple[Run, LoopState]:
    """Mesh, shardings, compiled steps, checkpoint manager, data iterators and the starting state (in ``model_dir``,
    made and locked by the caller)."""
    mesh_config = mesh_config or partitioning.MeshConfig()
    local_batch, per_process = _check_sizes(batch_size, microbatches, input_shards, on_nonfinite)
    mesh = partitioning.make_mesh(mesh_config)
    layout = trainer.state_layout(model_config, tx, mesh, mesh_config.rules)
    bsharding = partitioning.batch_sharding(mesh, mesh_config.rules)
    skip = on_nonfinite == "skip"
    step_fn = trainer.jit_train_step(
        model_config, tx, loss_config or losses.LossConfig(), microbatches, seed, layout, bsharding, mesh, skip_nonfinite=skip
    )
    if jax.process_index() == 0:
        write_run_files(model_dir, model_config, data)
    rows_multiple = _local_rows_multiple(bsharding, microbatches, jax.process_count())
    run = Run(
        model_dir=model_dir,
        model_config=model_config,
        data=data,
        mesh=mesh,
        bsharding=bsharding,
        layout=layout,
        step_fn=step_fn,
        eval_fn=trainer.jit_eval_step(model_config, layout, bsharding, mesh),
        manager=run_checkpoints.make_manager(model_dir, keep_checkpoints, async_checkpoints),
        train_iter=_train_iterator(data, local_batch, per_process, seed, rows_multiple),
        local_batch=local_batch,
        eval_sets={},
        on_nonfinite=on_nonfinite,
    )
    loop = _initial_state(run, tx, seed, init_checkpoint)
    # data positions of steps never committed, or whose checkpoint was pruned just before a kill
    run_checkpoints.prune_data(model_dir, set(run.manager.all_steps()))
    if eval_every:
        sets = _equalize(data.eval_sets("validation", local_batch, jax.process_index(), jax.process_count()))
        run = dataclasses.replace(run, eval_sets=sets)
    return run, loop


def train_loop(run: Run, sched: Schedule, loop: LoopState, writer: metrics_log.MetricsWriter, progress: bool) -> None:
    """Steps up to ``sched.num_steps``, logging, evaluating and saving when due; SIGTERM/SIGINT saves and stops."""
    stop = _StopFlag()
    start = int(jax.device_get(loop.state.step))
    pbar = None
    if progress and jax.process_index() == 0:
        from tqdm import tqdm

        pbar = tqdm(total=sched.num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    rate = metrics_log.RateMeter()
    try:
        with jax.set_mesh(run.mesh):
            for done in range(start + 1, sched.num_steps + 1):
                batch = partitioning.global_batch(next(run.train_iter), run.bsharding)
                loop.state, metrics = run.step_fn(loop.state, batch)
                loop.nonfinite = trainer.track_nonfinite(loop.nonfinite, metrics["nonfinite"], done)
                rate.add(metrics)
                if due(done, sched.log_every, sched.num_steps):
                    _log_train(run, loop, writer, done, metrics, rate.read(), pbar)
                with rate.paused():  # evaluation and checkpoints are not training time
                    evaluated = _evaluate(run, loop, writer, done) if due(done, sched.eval_every, sched.num_steps) else None
                    if pbar is not None:
                        pbar.update(1)
                    last = done == sched.num_steps or stop.signum is not None
                    if evaluated is not None or due(done, sched.checkpoint_every, sched.num_steps) or last:
                        save(run, loop, done, evaluated)
                if stop.signum is not None:
                    run.manager.wait_until_finished()
                    log.warning("stopped by signal %d at step %d; rerun the same command to resume", stop.signum, done)
                    loop.stopped_at = done
                    return
    finally:
        if pbar is not None:
            pbar.close()
        run.manager.wait_until_finished()
        run_checkpoints.prune_data(run.model_dir, set(run.manager.all_steps()))


def check_finite(run: Run, loop: LoopState) -> None:
    """Raises NonFiniteLossError (``on_nonfinite='stop'``) once any step so far was not finite."""
    first, flags, _ = (int(x) for x in jax.device_get(loop.nonfinite))
    if not first or run.on_nonfinite != "stop":
        return
    last = (
        f"The last good checkpoint is step {loop.saved_step} in {run.model_dir / 'checkpoints'}"
        if loop.saved_step >= 0
        else "No checkpoint was saved"
    )
    raise NonFiniteLossError(
        f"at step {first} {trainer.describe_nonfinite(flags)}; stopping before that state is saved or evaluated. "
        f"{last} (lower the learning rate or check the data; train.on_nonfinite='skip' skips such updates instead)."
    )


def _log_train(
    run: Run, loop: LoopState, writer: metrics_log.MetricsWriter, done: int, metrics: dict, rates: dict, pbar: Any
) -> None:
    """One train row in metrics.jsonl (logged before the finiteness check, so it shows the step that diverged)."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "nonfinite"}
    m.update(rates)
    if run.on_nonfinite == "skip":
        flagged = int(jax.device_get(loop.nonfinite)[2])
        m["skipped_updates"] = float(flagged - loop.skipped_logged)
        if flagged > loop.skipped_logged:
            log.warning("skipped %d non-finite updates up to step %d", flagged - loop.skipped_logged, done)
        loop.skipped_logged = flagged
    writer.write(done, "train", m)
    check_finite(run, loop)
    loop.first_train = loop.first_train or m
    loop.last_train = m
    if pbar is not None:
        pbar.set_postfix(loss=f"{m['loss']:.4f}", ex_s=f"{m['examples_per_sec']:.1f}", tok_s=f"{m['real_tokens_per_sec']:.0f}")


def _score(run: Run, params: Any, split: str, sets: dict[str, list[dict]]) -> dict[str, float]:
    """Per-task losses and accuracies; the selection task's accuracy is its own metric (and rank accuracy)."""
    args = (params, run.model_config, run.data, split, sets, run.local_batch, run.bsharding)
    metrics = run_eval(run.eval_fn, params, sets, run.local_batch, run.bsharding)
    return scoring.with_rank_accuracy(scoring.use_task_metric(metrics, *args), *args)


def _evaluate(run: Run, loop: LoopState, writer: metrics_log.MetricsWriter, done: int) -> dict[str, float]:
    check_finite(run, loop)  # a non-finite state is never evaluated, so never chosen as best
    metrics = _score(run, loop.state.params, "validation", run.eval_sets)
    writer.write(done, "eval", metrics)
    loop.last_eval = metrics
    log.info("step %d eval: %s", done, json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return metrics


def save(run: Run, loop: LoopState, step: int, evaluated: dict[str, float] | None) -> None:
    """Checkpoints ``loop.state`` at ``step`` (never a non-finite one); validation accuracy feeds keep-best."""
    check_finite(run, loop)
    accuracy = evaluated.get(run.metric_key) if evaluated else None
    run_checkpoints.save(run.manager, run.model_dir, step, loop.state, run.train_iter, run.model_config, accuracy)
    loop.saved_step = step


def _summary(run: Run, num_steps: int, loop: LoopState) -> dict[str, Any]:
    summary: dict[str, Any] = {"step": num_steps, "train": loop.last_train, "validation": loop.last_eval}
    summary["losses_first_last"] = {
        k: [loop.first_train.get(k), loop.last_train.get(k)]
        for k, n in (("label_loss", "label_sequences"), ("rationale_loss", "rationale_sequences"))
        if loop.last_train.get(n, 1.0) > 0 and k in loop.last_train
    }
    summary["best_step"] = run.manager.best_step()
    if run.on_nonfinite == "skip":
        summary["skipped_updates"] = loop.skipped_logged
    return summary


def test_on_best(run: Run, best: int, report_train_examples: int) -> dict[str, Any]:
    """Scores the checkpoint selected on validation on a train subset, validation and test (once, in full);
    writes ``test_metrics.json``."""
    params = run_checkpoints.restore_state(run.manager, best, run.layout).params
    out: dict[str, Any] = {"splits": {}}
    for split, limit in (("train", report_train_examples), ("validation", None), ("test", None)):
        if split == "train" and not report_train_examples:
            continue
        sets = _equalize(run.data.eval_sets(split, run.local_batch, jax.process_index(), jax.process_count(), limit))
        if not sets:
            continue
        with jax.set_mesh(run.mesh):
            metrics = run_eval(run.eval_fn, params, sets, run.local_batch, run.bsharding)
            args = (run.model_config, run.data, split, sets, metrics, run.local_batch, run.bsharding)
            out["splits"][split] = row = scoring.split_report(params, *args)
        if split == "test":
            out["test"] = scoring.metrics_with_row(metrics, run.data, row)
    if hasattr(run.data, "baselines"):
        split = "test" if "test" in out["splits"] else "validation"
        out["baselines"] = {"split": split, **run.data.baselines(split)}
    if "test" in out:
        out["test_checkpoint"] = best
        if jax.process_index() == 0:
            (run.model_dir / "test_metrics.json").write_text(json.dumps({"step": best, **out["test"]}, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("Flags: --gin_file=FILE (repeatable), --gin.NAME=VALUE (repeatable), --model_dir=DIR, --verbose")
        print("(--verbose keeps TensorFlow's and XLA's start-up messages, hidden by default).")
        print("Run gin files: " + ", ".join(sorted(p.name for p in (configs.GIN_DIR / "runs").glob("*.gin"))))
        return 0
    files, bindings, rest = configs.split_gin_args(argv)
    model_dir, verbose = None, False
    for arg in rest:
        if arg == "--verbose":
            verbose = True
        elif arg.startswith("--model_dir="):
            model_dir = arg.split("=", 1)[1]
        else:
            print(f"dss-train: unknown flag {arg!r} (see --help)", file=sys.stderr)
            return 2
    if not files:
        print("dss-train: --gin_file is required (see --help)", file=sys.stderr)
        return 2
    if not verbose:
        configs.quiet_data_layer_imports()
    configs.setup_logging()
    partitioning.maybe_initialize_distributed()
    configs.parse_gin(files, bindings)
    if model_dir is None:
        try:
            model_dir = configs.query_macro("MODEL_DIR")
        except ValueError:
            print("dss-train: pass --model_dir=DIR (or bind MODEL_DIR in gin)", file=sys.stderr)
            return 2
    try:
        summary = train(model_dir)
    except NonFiniteLossError as e:
        print(f"dss-train: {configs.error_text(e)}", file=sys.stderr)
        return 3
    except run_checkpoints.ModelDirBusyError as e:
        print(f"dss-train: error: {configs.error_text(e)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:  # bad config or data: gin's message names the binding
        print(f"dss-train: error: {configs.error_text(e)}", file=sys.stderr)
        return 2
    if "stopped_at" in summary:
        return 0
    print(run_report.format_table(summary, Path(model_dir).resolve()))
    return 0


if __name__ == "__main__":
    # `python -m dss_jax.train` runs this file as __main__; gin binds the importable dss_jax.train.train.
    from dss_jax.train import main as _main

    sys.exit(_main())
