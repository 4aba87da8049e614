"""``dss-train``: the gin-configured training loop, with evaluation, checkpoints and exact resume.

    dss-train --gin_file=gin/runs/quickstart.gin --model_dir=/tmp/dss_quickstart [--gin.NAME=VALUE ...]

Model dir layout: ``checkpoints/<step>/`` (Orbax: state + meta), ``data/<step>/process_<i>`` (the data
iterator's position at that step, pruned with its checkpoint), ``metrics.jsonl``, ``tb/`` (TensorBoard),
``config.gin`` (operative config), ``test_metrics.json`` (the test split, scored once, for the checkpoint selected
on validation), ``damaged/`` (checkpoint steps that failed their checksums at resume, moved aside).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp

from dss_jax import batching, checkpoints, configs, losses, optim, partitioning, run_report, scoring, trainer
from dss_jax.model import T5Config

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
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    @property
    def checkpointable(self) -> bool:
        return all(hasattr(it, "save") and hasattr(it, "restore") for it in self.iterators)

    def save(self, path: str) -> None:
        if self.checkpointable:
            for i, it in enumerate(self.iterators):
                it.save(f"{path}_shard{i}")

    def restore(self, path: str) -> None:
        if not self.checkpointable:
            log.warning("the data source cannot restore its position: the resumed run sees data from the start")
            return
        for i, it in enumerate(self.iterators):
            it.restore(f"{path}_shard{i}")


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


def _manager(model_dir: Path, keep: int, async_save: bool) -> ocp.CheckpointManager:
    cm = ocp.checkpoint_managers
    policy = cm.AnyPreservationPolicy(
        [
            cm.LatestN(n=keep),
            cm.BestN(get_metric_fn=lambda m: m["accuracy"], reverse=False, n=1, keep_checkpoints_without_metrics=False),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        best_fn=lambda m: m["accuracy"],
        best_mode="max",
        create=True,
        enable_async_checkpointing=async_save,
    )
    return ocp.CheckpointManager(model_dir / "checkpoints", options=options)


def write_run_files(model_dir: Path, model_config: T5Config, data: DataSource) -> None:
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


def _restore_state(
    manager: ocp.CheckpointManager, step: int, layout: trainer.StateLayout, trusted_without: bool
) -> trainer.TrainState:
    """The train state of ``step``, placed with this run's shardings (the saving mesh may differ), verified against
    the checksums saved with it. Unreadable files or differing values raise CheckpointDamagedError; a state of
    another model or optimizer raises ValueError (a config error, not damage: nothing falls back)."""
    step_dir = Path(str(manager.directory)) / str(step)
    stored = sorted(checkpoints.stored_leaf_shapes(step_dir / "state"))
    want = sorted(tuple(a.shape) for a in jax.tree.leaves(layout.abstract))
    if stored != want:
        raise ValueError(
            f"{step_dir} holds a train state of another model or optimizer ({len(stored)} arrays, this run has "
            f"{len(want)}): use another --model_dir, or the gin config that wrote it"
        )
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), layout.abstract, layout.shardings)
    state = checkpoints.read_or_damaged(
        lambda: manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"], step_dir
    )
    checkpoints.verify_checksums(state, checkpoints.read_checksums(step_dir), step_dir, trusted_without)
    return state


def _all_processes(ok: bool) -> bool:
    """True when ``ok`` holds on every process (so that all processes fall back to the same step)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _resume(
    manager: ocp.CheckpointManager, model_dir: Path, layout: trainer.StateLayout, train_iter: Any
) -> tuple[trainer.TrainState, int] | None:
    """The newest intact checkpoint (state and data position), or None when there is none.

    Steps newer than it that fail to read or to verify are named, moved to ``model_dir/damaged/`` (so this run
    can save those steps again) and redone from the intact step; one warning says where training resumes.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    damaged: list[int] = []
    found: tuple[trainer.TrainState, int] | None = None
    for step in steps:
        err: Exception | None = None
        legacy = not checkpoints.checksums_expected(model_dir / "checkpoints" / str(step))
        try:
            state = _restore_state(manager, step, layout, legacy)
            checkpoints.verify_file_digests(_data_ckpt_path(model_dir, step), step, legacy)
        except checkpoints.CheckpointDamagedError as e:
            err = e
        if _all_processes(err is None):
            found = (state, step)
            break
        log.error("%s", err or f"checkpoint step {step} is damaged on another process")
        damaged.append(step)
    if damaged:
        where = _move_aside(manager, model_dir, damaged)
        names = ("steps " if len(damaged) > 1 else "step ") + ", ".join(map(str, damaged))
        if found is not None:
            log.warning(
                "checkpoint %s damaged (moved to %s); resuming from step %d, the newest intact checkpoint",
                names,
                where,
                found[1],
            )
        else:
            log.warning("checkpoint %s damaged (moved to %s); no intact checkpoint left: starting afresh", names, where)
    if found is not None:
        train_iter.restore(_data_ckpt_path(model_dir, found[1]))
    return found


def _move_aside(manager: ocp.CheckpointManager, model_dir: Path, steps: list[int]) -> Path:
    """Moves damaged checkpoint steps to ``model_dir/damaged/<step>-<time>`` for inspection (their data positions,
    large and useless alone, are pruned with the other orphans)."""
    import shutil

    where = model_dir / "damaged"
    if jax.process_index() == 0:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        where.mkdir(parents=True, exist_ok=True)
        for s in steps:
            shutil.move(str(model_dir / "checkpoints" / str(s)), str(where / f"{s}-{stamp}"))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dss_jax.train.move_aside")
    manager.reload()
    return where


def _data_ckpt_path(model_dir: Path, step: int) -> str:
    return str(model_dir / "data" / str(step) / f"process_{jax.process_index()}")


def _prune_data(model_dir: Path, keep: set[int]) -> None:
    """Deletes this process's data-iterator states of steps whose model checkpoint is gone (or never committed):
    they are many times the model checkpoint's size, and useless without it."""
    import shutil

    root = model_dir / "data"
    if not root.is_dir():
        return
    mine = f"process_{jax.process_index()}_"
    for d in root.iterdir():
        if not d.name.isdigit() or int(d.name) in keep:
            continue
        for f in d.iterdir():
            if not (f.name.startswith(mine) or f.name == f"process_{jax.process_index()}{checkpoints.DATA_DIGEST_SUFFIX}"):
                continue
            if f.is_dir():
                shutil.rmtree(f, ignore_errors=True)
            else:
                f.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            d.rmdir()  # the last process out removes the step's dir


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


class RateMeter:
    """Examples/s and real (non-padding) tokens/s between log steps, measured after the device finished them.

    Reading the metrics at a log step waits for the device, so the window ends where the work ended; time spent
    in evaluation and checkpointing (``paused``) is left out.
    """

    def __init__(self) -> None:
        self.pending: list[dict[str, Any]] = []
        self.t0 = time.time()
        self.excluded = 0.0

    def add(self, metrics: dict[str, Any]) -> None:
        keys = ("label_sequences", "rationale_sequences", "target_tokens", "nonpad_input_tokens")
        self.pending.append({k: metrics[k] for k in keys if k in metrics})

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t = time.time()
        try:
            yield
        finally:
            self.excluded += time.time() - t

    def read(self) -> dict[str, float]:
        sums: dict[str, float] = {}
        for m in jax.device_get(self.pending):
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        dt = max(time.time() - self.t0 - self.excluded, 1e-9)
        inputs = sums.get("label_sequences", 0.0) or sums.get("rationale_sequences", 0.0)
        out = {
            "steps_per_sec": len(self.pending) / dt,
            "examples_per_sec": inputs / dt,
            "real_tokens_per_sec": (sums.get("target_tokens", 0.0) + sums.get("nonpad_input_tokens", 0.0)) / dt,
        }
        self.pending, self.t0, self.excluded = [], time.time(), 0.0
        return out


def strict_json_row(row: dict[str, Any]) -> str:
    """One strict JSON line: non-finite numbers (which json.dumps would write as the non-JSON tokens NaN and
    Infinity) become null, and the row's ``nonfinite`` lists their keys."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        row = {**{k: (None if k in bad else v) for k, v in row.items()}, "nonfinite": bad}
    return json.dumps(row, allow_nan=False)


def truncate_metrics(path: Path, resumed_step: int) -> None:
    """Keeps the rows of steps up to ``resumed_step``: the steps after it are redone by the resumed run, which
    would otherwise log them twice (a torn last line from a kill goes too)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= resumed_step:
            keep.append(line + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    tmp.replace(path)


class MetricsWriter:
    """metrics.jsonl (strict JSON, each step once) and TensorBoard, from process 0 only."""

    def __init__(self, model_dir: Path, resumed_step: int = 0):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        truncate_metrics(model_dir / "metrics.jsonl", resumed_step)
        self.jsonl = open(model_dir / "metrics.jsonl", "a", encoding="utf-8")
        # purge_step: TensorBoard drops the events the earlier run wrote after the resumed step
        self.tb = SummaryWriter(str(model_dir / "tb"), purge_step=resumed_step + 1 if resumed_step else None)

    def write(self, step: int, kind: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(strict_json_row({"step": step, "kind": kind, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(f"{kind}/{k}", v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


@gin.configurable(denylist=["model_dir"])
def train(
    model_dir: str,
    model_config: T5Config = gin.REQUIRED,
    data: DataSource = gin.REQUIRED,
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
    """Trains ``model_config`` on ``data`` for ``num_steps`` steps of ``batch_size`` sequences (global).

    Resumes from the latest checkpoint in ``model_dir`` (state and data position); otherwise starts from
    ``init_checkpoint`` (a dss_jax pretrained dir: parameters only, fresh optimizer) or from scratch.
    Each process reads ``input_shards / processes`` shards of the training data (default: one per process).
    At the end the checkpoint selected on validation is scored on a fixed train subset (the first
    ``report_train_examples``), the whole validation and the whole test split with the task's own metric.
    A step whose loss, gradient norm or updated parameters are not finite stops the run before that state is
    saved or evaluated (``on_nonfinite='stop'``), or is not applied and counted (``'skip'``: ``skipped_updates``
    in metrics.jsonl and the summary).
    Returns the final summary (also written to ``model_dir/summary.json``).
    """
    # A gin binding that nothing reads is an error: here, before the model dir is made, for all but what is first
    # called below (checked again before the first step)
    later = ("partitioning.MeshConfig", "losses.LossConfig", "optim.make_optimizer", "registry.DataOptions")
    configs.check_bindings_read("dss-train", pending=(*later, "registry.mixture_rate"))
    model_dir_p = Path(model_dir).resolve()
    model_dir_p.mkdir(parents=True, exist_ok=True)
    mesh_config = mesh_config or partitioning.MeshConfig()
    loss_config = loss_config or losses.LossConfig()
    nproc, pid = jax.process_count(), jax.process_index()
    if batch_size % (nproc * microbatches):
        raise ValueError(f"train.batch_size={batch_size} must divide by processes ({nproc}) x microbatches ({microbatches})")
    local_batch = batch_size // nproc
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"train.on_nonfinite={on_nonfinite!r}: expected 'stop' or 'skip'")

    mesh = partitioning.make_mesh(mesh_config)
    rules = mesh_config.rules
    tx = optim.make_optimizer()
    layout = trainer.state_layout(model_config, tx, mesh, rules)
    bsharding = partitioning.batch_sharding(mesh, rules)
    if batch_size % math.prod(bsharding.mesh.shape[a] for a in ("data", "fsdp")):
        raise ValueError(f"train.batch_size={batch_size} must divide by the mesh's data x fsdp size")
    step_fn = trainer.jit_train_step(
        model_config, tx, loss_config, microbatches, seed, layout, bsharding, mesh, skip_nonfinite=on_nonfinite == "skip"
    )
    eval_fn = trainer.jit_eval_step(model_config, layout, bsharding, mesh)

    manager = _manager(model_dir_p, keep_checkpoints, async_checkpoints)
    if pid == 0:
        write_run_files(model_dir_p, model_config, data)
    shards = input_shards or nproc
    if shards % nproc or local_batch % (shards // nproc):
        raise ValueError(f"train.input_shards={shards} must be a multiple of the processes ({nproc}) and divide the local batch")
    per = shards // nproc
    train_iter: Any = ShardedIterator(
        [data.train_iterator(local_batch // per, seed, s, shards) for s in range(pid * per, (pid + 1) * per)]
    )
    repacker = data.repacker(_local_rows_multiple(bsharding, microbatches, nproc)) if hasattr(data, "repacker") else None
    if repacker is not None:
        train_iter = batching.RepackingIterator(train_iter, repacker)
    resumed = _resume(manager, model_dir_p, layout, train_iter)
    latest = resumed[1] if resumed is not None else None
    if resumed is not None:
        state = resumed[0]
        log.info("resumed from %s at step %d", model_dir_p / "checkpoints", latest)
    elif init_checkpoint:
        params, _, _ = checkpoints.load_pretrained(init_checkpoint, model_config)
        state = trainer.init_state(model_config, tx, layout, seed, params)
        log.info("initialized parameters from %s", init_checkpoint)
    else:
        state = trainer.init_state(model_config, tx, layout, seed)
    start = int(jax.device_get(state.step))
    _prune_data(model_dir_p, set(manager.all_steps()))  # positions of steps never committed, or pruned before a kill
    writer = MetricsWriter(model_dir_p, start)

    eval_sets = _equalize(data.eval_sets("validation", local_batch, pid, nproc)) if eval_every else {}
    configs.check_bindings_read("dss-train")  # everything is built: every binding has been read by now, or never is
    stop = _StopFlag()
    metric_key = f"{data.selection_task}/accuracy"
    last_metrics: dict[str, float] = {}
    first_metrics: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    saved_step = latest if latest is not None else -1
    nonfinite = jax.numpy.zeros((3,), jax.numpy.int32)  # trainer.track_nonfinite: [first step, flags, count]

    def check_finite() -> int:
        """Raises (on_nonfinite='stop') once any step so far was not finite; returns the flagged steps so far."""
        first, flags, count = (int(x) for x in jax.device_get(nonfinite))
        if first and on_nonfinite == "stop":
            last = (
                f"The last good checkpoint is step {saved_step} in {model_dir_p / 'checkpoints'}"
                if saved_step >= 0
                else "No checkpoint was saved"
            )
            raise NonFiniteLossError(
                f"at step {first} {trainer.describe_nonfinite(flags)}; stopping before that state is saved or evaluated. "
                f"{last} (lower the learning rate or check the data; train.on_nonfinite='skip' skips such updates instead)."
            )
        return count

    def save(step: int, eval_metrics: dict[str, float] | None) -> None:
        nonlocal saved_step
        check_finite()  # never save a non-finite state
        data_prefix = _data_ckpt_path(model_dir_p, step)
        train_iter.save(data_prefix)
        checkpoints.write_file_digests(data_prefix)
        metrics = {"accuracy": eval_metrics[metric_key]} if eval_metrics and metric_key in eval_metrics else None
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave({"step": step, "model_config": model_config.to_dict()}),
                # committed with the state, so no committed step lacks them
                **{checkpoints.CHECKSUM_ITEM: ocp.args.JsonSave(checkpoints.checksum_record(state))},
            ),
            metrics=metrics,
            force=True,
        )
        saved_step = step
        _prune_data(model_dir_p, set(manager.all_steps()) | {step})

    pbar = None
    if progress and pid == 0:
        from tqdm import tqdm

        pbar = tqdm(total=num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    rate = RateMeter()
    skipped_logged = 0
    try:
        with jax.set_mesh(mesh):
            for step in range(start, num_steps):
                batch = partitioning.global_batch(next(train_iter), bsharding)
                state, metrics = step_fn(state, batch)
                done = step + 1
                nonfinite = trainer.track_nonfinite(nonfinite, metrics["nonfinite"], done)
                rate.add(metrics)
                if done % log_every == 0 or done == num_steps:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "nonfinite"}
                    m.update(rate.read())
                    if on_nonfinite == "skip":
                        flagged = int(jax.device_get(nonfinite)[2])
                        m["skipped_updates"] = float(flagged - skipped_logged)
                        if flagged > skipped_logged:
                            log.warning("skipped %d non-finite updates up to step %d", flagged - skipped_logged, done)
                        skipped_logged = flagged
                    writer.write(done, "train", m)
                    check_finite()  # logged first, so metrics.jsonl shows the step that diverged
                    first_metrics = first_metrics or m
                    last_metrics = m
                    if pbar is not None:
                        pbar.set_postfix(
                            loss=f"{m['loss']:.4f}", ex_s=f"{m['examples_per_sec']:.1f}", tok_s=f"{m['real_tokens_per_sec']:.0f}"
                        )
                eval_now = eval_every and (done % eval_every == 0 or done == num_steps)
                eval_metrics = None
                with rate.paused():
                    if eval_now:
                        check_finite()  # a non-finite state is never evaluated, so never chosen as best
                        eval_metrics = run_eval(eval_fn, state.params, eval_sets, local_batch, bsharding)
                        eval_metrics = scoring.use_task_metric(
                            eval_metrics, state.params, model_config, data, "validation", eval_sets, local_batch, bsharding
                        )
                        eval_metrics = scoring.with_rank_accuracy(
                            eval_metrics, state.params, model_config, data, "validation", eval_sets, local_batch, bsharding
                        )
                        writer.write(done, "eval", eval_metrics)
                        last_eval = eval_metrics
                        log.info("step %d eval: %s", done, json.dumps({k: round(v, 4) for k, v in eval_metrics.items()}))
                    if pbar is not None:
                        pbar.update(1)
                    if eval_now or done % checkpoint_every == 0 or done == num_steps or stop.signum is not None:
                        save(done, eval_metrics)
                if stop.signum is not None:
                    manager.wait_until_finished()
                    log.warning("stopped by signal %d at step %d; rerun the same command to resume", stop.signum, done)
                    return {"stopped_at": done}
    finally:
        if pbar is not None:
            pbar.close()
        manager.wait_until_finished()
        _prune_data(model_dir_p, set(manager.all_steps()))

    summary: dict[str, Any] = {"step": num_steps, "train": last_metrics, "validation": last_eval}
    summary["losses_first_last"] = {
        k: [first_metrics.get(k), last_metrics.get(k)]
        for k, n in (("label_loss", "label_sequences"), ("rationale_loss", "rationale_sequences"))
        if last_metrics.get(n, 1.0) > 0 and k in last_metrics
    }
    best = manager.best_step()
    summary["best_step"] = best
    if on_nonfinite == "skip":
        summary["skipped_updates"] = skipped_logged
    if evaluate_test and best is not None:
        best_state = _restore_state(
            manager, best, layout, not checkpoints.checksums_expected(model_dir_p / "checkpoints" / str(best))
        )
        summary["splits"] = {}
        for split, limit in (("train", report_train_examples), ("validation", None), ("test", None)):
            if split == "train" and not report_train_examples:
                continue
            sets = _equalize(data.eval_sets(split, local_batch, pid, nproc, limit))
            if not sets:
                continue
            with jax.set_mesh(mesh):
                tf_metrics = run_eval(eval_fn, best_state.params, sets, local_batch, bsharding)
                row = scoring.split_report(best_state.params, model_config, data, split, sets, tf_metrics, local_batch, bsharding)
                if split == "test":
                    summary["test"] = scoring.use_task_metric(
                        tf_metrics, best_state.params, model_config, data, split, sets, local_batch, bsharding
                    )
                    if "rank_accuracy" in row:
                        summary["test"][f"{data.selection_task}/rank_accuracy"] = row["rank_accuracy"]
            summary["splits"][split] = row
        if hasattr(data, "baselines"):
            split = "test" if "test" in summary["splits"] else "validation"
            summary["baselines"] = {"split": split, **data.baselines(split)}
        if "test" in summary:
            summary["test_checkpoint"] = best
            if pid == 0:
                (model_dir_p / "test_metrics.json").write_text(json.dumps({"step": best, **summary["test"]}, indent=2) + "\n")
    if pid == 0:
        run_report.plot_losses(model_dir_p)
        (model_dir_p / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    writer.close()
    manager.close()
    return summary


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
        print(f"dss-train: {e}", file=sys.stderr)
        return 3
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
