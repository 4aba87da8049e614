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
import signal
import sys
from pathlib import Path
from typing import Any

import gin
import jax
import optax

from dss_jax import (
    checkpoints,
    gin_utils,
    logs,
    losses,
    metrics_log,
    partitioning,
    run_checkpoints,
    run_summary,
    train_setup,
    trainer,
)
from dss_jax.data_source import DataSource
from dss_jax.model import ModelConfig
from dss_jax.train_setup import LoopState, NonFiniteLossError, Run, Schedule, due

log = logging.getLogger("dss_jax.train")


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
    rng_impl: str = "threefry2x32",
) -> dict[str, Any]:
    """Trains ``model_config`` on ``data`` with ``optimizer`` for ``num_steps`` steps of ``batch_size`` sequences.

    Resumes from the newest intact checkpoint in ``model_dir``, else starts from ``init_checkpoint`` (parameters
    only) or from scratch; ``on_nonfinite`` stops the run at a non-finite step, or skips (and counts) its update.
    Returns the summary (``summary.json``): the checkpoint selected on validation scored on a train subset
    (``report_train_examples``), validation and test. ``input_shards``: training-data shards (default: processes).
    ``rng_impl``: what draws the dropout masks (``trainer.RNG_IMPLS``).
    """
    model_dir_path = Path(model_dir).resolve()
    # the configuration is checked before the model dir is made or locked: a bad value leaves nothing behind
    train_setup.check_sizes(batch_size, microbatches, input_shards, on_nonfinite)
    train_setup.check_rng_impl(rng_impl)
    train_setup.check_schedule(num_steps, eval_every, checkpoint_every, keep_checkpoints, log_every)
    train_setup.check_mesh(batch_size, mesh_config)
    gin_utils.check_bindings_read("dss-train", pending=CALLED_LATER)  # a binding nothing reads (checked again below)
    train_setup.make_model_dir(model_dir_path)
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
            rng_impl=rng_impl,
        )
        gin_utils.check_bindings_read("dss-train")  # everything is built: every binding has been read by now, or never is
        writer = metrics_log.MetricsWriter(run.model_dir, int(jax.device_get(loop.state.step)))
        train_loop(run, Schedule(num_steps, log_every, eval_every, checkpoint_every), loop, writer, progress)
        if loop.stopped_at is not None:
            return {"stopped_at": loop.stopped_at}
        summary = _summary(run, num_steps, loop)
        if evaluate_test and summary["best_step"] is not None:
            summary.update(test_on_best(run, summary["best_step"], report_train_examples))
        if jax.process_index() == 0:
            run_summary.plot_losses(run.model_dir)
            (run.model_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        writer.close()
        run.manager.close()
    return summary


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
    rng_impl: str,
) -> tuple[Run, LoopState]:
    """Mesh, shardings, compiled steps, checkpoint manager, data iterators and the starting state (in ``model_dir``,
    made and locked by the caller)."""
    mesh_config = mesh_config or partitioning.MeshConfig()
    local_batch, per_process = train_setup.check_sizes(batch_size, microbatches, input_shards, on_nonfinite)
    mesh = partitioning.make_mesh(mesh_config)
    layout = trainer.state_layout(model_config, tx, mesh, mesh_config.rules)
    bsharding = partitioning.batch_sharding(mesh, mesh_config.rules)
    skip = on_nonfinite == "skip"
    step_fn = trainer.jit_train_step(
        model_config, tx, loss_config or losses.LossConfig(), microbatches, seed, layout, bsharding, mesh, skip, rng_impl
    )
    if jax.process_index() == 0:
        train_setup.write_run_files(model_dir, model_config, data)
    rows_multiple = train_setup.local_rows_multiple(bsharding, microbatches, jax.process_count())
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
        train_iter=train_setup.train_iterator(data, local_batch, per_process, seed, rows_multiple),
        local_batch=local_batch,
        validation=None,
        on_nonfinite=on_nonfinite,
    )
    loop = _initial_state(run, tx, seed, init_checkpoint)
    # data positions of steps never committed, or whose checkpoint was pruned just before a kill
    run_checkpoints.prune_data(model_dir, set(run.manager.all_steps()))
    if eval_every:
        run = dataclasses.replace(run, validation=run.split_evaluators("validation"))
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
    if first and run.on_nonfinite == "stop":
        raise nonfinite_error(first, flags, loop.saved_step, run.model_dir / "checkpoints")


def nonfinite_error(first: int, flags: int, saved_step: int, checkpoint_dir: Path) -> NonFiniteLossError:
    """The one line a diverged run ends with: the step, what was not finite, and the last good checkpoint."""
    last = f"The last good checkpoint is step {saved_step} in {checkpoint_dir}" if saved_step >= 0 else "No checkpoint was saved"
    return NonFiniteLossError(
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


def _evaluate(run: Run, loop: LoopState, writer: metrics_log.MetricsWriter, done: int) -> dict[str, float]:
    """Runs the validation evaluators on ``loop.state`` and logs their metrics."""
    check_finite(run, loop)  # a non-finite state is never evaluated, so never chosen as best
    assert run.validation is not None, "evaluation is due only when train.eval_every > 0"
    metrics = dict(run.validation.run(loop.state.params))
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
        evs = run.split_evaluators(split, limit, decode_always=True)
        if not evs.teacher_forced.sets:
            continue
        with jax.set_mesh(run.mesh):
            results = evs.results(params)
        out["splits"][split] = evs.report_row(results)
        if split == "test":
            out["test"] = evs.task_metrics(results)
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
        print("Run gin files: " + ", ".join(sorted(p.name for p in (gin_utils.GIN_DIR / "runs").glob("*.gin"))))
        return 0
    files, bindings, rest = gin_utils.split_gin_args(argv)
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
        logs.quiet_data_layer_imports()
    logs.setup_logging()
    partitioning.maybe_initialize_distributed()
    gin_utils.parse_gin(files, bindings)
    if model_dir is None:
        try:
            model_dir = str(gin_utils.query_macro("MODEL_DIR"))
        except ValueError:
            print("dss-train: pass --model_dir=DIR (or bind MODEL_DIR in gin)", file=sys.stderr)
            return 2
    try:
        summary = train(model_dir)
    except NonFiniteLossError as e:
        print(f"dss-train: {gin_utils.error_text(e)}", file=sys.stderr)
        return 3
    except run_checkpoints.ModelDirBusyError as e:
        print(f"dss-train: error: {gin_utils.error_text(e)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:  # bad config or data: gin's message names the binding
        print(f"dss-train: error: {gin_utils.error_text(e)}", file=sys.stderr)
        return 2
    if "stopped_at" in summary:
        return 0
    print(run_summary.format_table(summary, Path(model_dir).resolve()))
    return 0


if __name__ == "__main__":
    # `python -m dss_jax.train` runs this file as __main__; gin binds the importable dss_jax.train.train.
    from dss_jax.train import main as _main

    sys.exit(_main())
