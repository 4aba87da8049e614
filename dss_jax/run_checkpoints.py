"""A training run's checkpoints in its model dir: save, prune, and resume from the newest intact step.

``checkpoints/<step>/`` holds the Orbax train state, its meta (step, model config) and the per-array checksums;
``data/<step>/process_<i>`` the data iterator's position at that step (with a file digest), pruned with its
checkpoint; ``damaged/`` the steps that failed their checksums at resume, moved aside for inspection; ``.lock`` the flock that makes
one dss-train the dir's only writer.
(``checkpoints.py`` reads parameters out of these for eval, infer and export; this module is the trainer's side.)
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dss_jax import integrity, trainer
from dss_jax.model import ModelConfig

log = logging.getLogger("dss_jax.train")


LOCK_FILE = ".lock"


class ModelDirBusyError(RuntimeError):
    """Another dss-train holds the model dir: two writers would train over each other's checkpoints and metrics."""


@contextlib.contextmanager
def exclusive(model_dir: Path) -> Iterator[None]:
    """Holds ``model_dir/.lock`` (``fcntl.flock``, exclusive, not waiting) for the body, or raises ModelDirBusyError
    naming the holder (pid, host, since when) that the file records.

    The kernel drops an flock when its process dies, SIGKILL included, so a killed run's lock never blocks the next
    run; the file itself stays (unlinking it would let two writers lock two different files). Multi-host runs: process
    0 holds it and every process learns the outcome, so all stop together."""
    handle = None
    holder = ""
    if jax.process_index() == 0:
        handle = open(model_dir / LOCK_FILE, "a+", encoding="utf-8")  # held open for the body
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "holder not recorded yet"
            handle.close()
            handle = None
        else:
            since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on host {socket.gethostname()} since {since}\n")
            handle.flush()
    if not _from_process_0(handle is not None or jax.process_index() != 0):
        raise ModelDirBusyError(
            f"{model_dir} is being written by another dss-train ({holder or 'see process 0'}): wait for it to end or "
            "stop it, or give this run another --model_dir"
        )
    try:
        yield
    finally:
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def _from_process_0(ok: bool) -> bool:
    """Process 0's ``ok`` on every process."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.array(ok)))


def make_manager(model_dir: Path, keep: int, async_save: bool) -> ocp.CheckpointManager:
    """Keeps the newest ``keep`` steps plus the best on validation accuracy (see api-notes: keep-best)."""
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


def data_path(model_dir: Path, step: int) -> str:
    """Where this process saves the data iterator's position at ``step``."""
    return str(model_dir / "data" / str(step) / f"process_{jax.process_index()}")


def save(
    manager: ocp.CheckpointManager,
    model_dir: Path,
    step: int,
    state: trainer.TrainState,
    train_iter: Any,
    model_config: ModelConfig,
    accuracy: float | None,
) -> None:
    """Saves the data position (with its digest), then the state with its checksums (committed together, so no
    committed step lacks them); ``accuracy`` (validation) feeds keep-best. Prunes data positions left orphaned."""
    prefix = data_path(model_dir, step)
    train_iter.save(prefix)
    integrity.write_file_digests(prefix)
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({"step": step, "model_config": model_config.to_dict()}),
            **{integrity.CHECKSUM_ITEM: ocp.args.JsonSave(integrity.checksum_record(state))},
        ),
        metrics=None if accuracy is None else {"accuracy": accuracy},
        force=True,
    )
    prune_data(model_dir, set(manager.all_steps()) | {step})


def restore_state(manager: ocp.CheckpointManager, step: int, layout: trainer.StateLayout) -> trainer.TrainState:
    """The train state of ``step``, placed with this run's shardings (the saving mesh may differ), verified against
    the checksums saved with it. Unreadable files or differing values raise CheckpointDamagedError; a state of
    another model or optimizer raises ValueError (a config error, not damage: nothing falls back)."""
    step_dir = Path(str(manager.directory)) / str(step)
    stored = sorted(integrity.stored_leaf_shapes(step_dir / "state"))
    want = sorted(tuple(a.shape) for a in jax.tree.leaves(layout.abstract))
    if stored != want:
        raise ValueError(
            f"{step_dir} holds a train state of another model or optimizer ({len(stored)} arrays, this run has "
            f"{len(want)}): use another --model_dir, or the gin config that wrote it"
        )
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), layout.abstract, layout.shardings)
    state = integrity.read_or_damaged(
        lambda: manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"], step_dir
    )
    legacy = not integrity.checksums_expected(step_dir)
    integrity.verify_checksums(state, integrity.read_checksums(step_dir), step_dir, legacy)
    return state


def _all_processes(ok: bool) -> bool:
    """True when ``ok`` holds on every process (so that all processes fall back to the same step)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _read_step(manager: ocp.CheckpointManager, model_dir: Path, step: int, layout: trainer.StateLayout) -> Any:
    """(state, None) for an intact step, (None, the error) for a damaged one."""
    try:
        state = restore_state(manager, step, layout)
        legacy = not integrity.checksums_expected(model_dir / "checkpoints" / str(step))
        position = Path(data_path(model_dir, step))
        if not legacy and not position.parent.is_dir():  # every save writes it, with a digest record at least
            raise integrity.CheckpointDamagedError(
                f"checkpoint step {step}: its data-iterator state {position.parent} is missing"
            )
        integrity.verify_file_digests(position, step, legacy)
        return state, None
    except integrity.CheckpointDamagedError as e:
        return None, e


def resume(
    manager: ocp.CheckpointManager, model_dir: Path, layout: trainer.StateLayout, train_iter: Any
) -> tuple[trainer.TrainState, int] | None:
    """The newest intact checkpoint (state and data position, restored into ``train_iter``), or None.

    Steps newer than it that fail to read or to verify are named, moved to ``model_dir/damaged/`` (so this run
    can save those steps again) and redone from the intact step; one warning says where training resumes.
    """
    damaged: list[int] = []
    found: tuple[trainer.TrainState, int] | None = None
    for step in sorted(manager.all_steps(), reverse=True):
        state, err = _read_step(manager, model_dir, step, layout)
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
        train_iter.restore(data_path(model_dir, found[1]))
    return found


def _move_aside(manager: ocp.CheckpointManager, model_dir: Path, steps: list[int]) -> Path:
    """Moves damaged checkpoint steps to ``model_dir/damaged/<step>-<time>`` for inspection (their data positions,
    large and useless alone, are pruned with the other orphans)."""
    where = model_dir / "damaged"
    if jax.process_index() == 0:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        where.mkdir(parents=True, exist_ok=True)
        for s in steps:
            shutil.move(str(model_dir / "checkpoints" / str(s)), str(where / f"{s}-{stamp}"))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dss_jax.run_checkpoints.move_aside")
    manager.reload()
    return where


def prune_data(model_dir: Path, keep: set[int]) -> None:
    """Deletes this process's data-iterator states of steps whose model checkpoint is gone (or never committed):
    useless without it."""
    root = model_dir / "data"
    if not root.is_dir():
        return
    pid = jax.process_index()
    for d in root.iterdir():
        if not d.name.isdigit() or int(d.name) in keep:
            continue
        for f in d.iterdir():
            if not (f.name.startswith(f"process_{pid}_") or f.name == f"process_{pid}{integrity.DATA_DIGEST_SUFFIX}"):
                continue
            if f.is_dir():
                shutil.rmtree(f, ignore_errors=True)
            else:
                f.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            d.rmdir()  # the last process out removes the step's dir
