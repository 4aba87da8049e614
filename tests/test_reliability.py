"""Nothing lost, nothing silent: damaged checkpoints are named and skipped, data positions are pruned with their
checkpoints, divergence stops the run before a bad state is saved, and metrics.jsonl is strict JSON with each step
once. The integration tests run the real CLIs on the toy task with real Orbax checkpoints."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import train_cmd, xla_env
from factories import tiny_t5
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dss_jax import checkpoints, configs, integrity, metrics_log


def _strict_rows(model_dir):
    """metrics.jsonl rows, parsed strictly: NaN/Infinity tokens raise."""

    def refuse(token):
        raise ValueError(f"non-JSON token {token}")

    text = (model_dir / "metrics.jsonl").read_text()
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def _params(step_dir):
    return ocp.StandardCheckpointer().restore(step_dir / "state")["params"]


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _steps(d):
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


# --- checksums ------------------------------------------------------------------------------------------------


def test_checksums_are_mesh_independent_and_catch_small_changes():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 48)).astype(np.float32)
    tree = {"params": {"a": a, "b": rng.standard_normal((7,)).astype(jnp.bfloat16)}, "step": np.int32(3)}
    ref = integrity.tree_checksums(tree)
    mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded = {
        "params": {"a": jax.device_put(a, NamedSharding(mesh, P("y", "x"))), "b": tree["params"]["b"]},
        "step": tree["step"],
    }
    assert integrity.tree_checksums(sharded) == ref  # order-free sums: any mesh gives the same bits
    swapped, signs = a.copy(), a.copy()
    swapped[[3, 4], [4, 3]] = swapped[[4, 3], [3, 4]]
    signs[0, :2] = -signs[0, :2]  # two sign bits: invisible to plain and position-weighted sums
    for changed in (swapped, signs):
        assert integrity.tree_checksums({**tree, "params": {**tree["params"], "a": changed}})["params/a"] != ref["params/a"]


def test_restored_values_that_differ_from_the_saved_checksums_name_the_step(tmp_path):
    tree = {"params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}}
    step_dir = tmp_path / "checkpoints" / "7"
    with ocp.CheckpointManager(tmp_path / "checkpoints") as mgr:
        args = {
            "state": ocp.args.StandardSave(tree),
            integrity.CHECKSUM_ITEM: ocp.args.JsonSave(integrity.checksum_record(tree)),
        }
        mgr.save(7, args=ocp.args.Composite(**args))
    record = integrity.read_checksums(step_dir)
    integrity.verify_checksums(tree, record, step_dir, trusted_without=False)
    bad = {"params": {"w": tree["params"]["w"] + np.eye(3, 4, dtype=np.float32)}}
    with pytest.raises(integrity.CheckpointDamagedError, match=r"step 7 is damaged: 1 of 1 arrays .*params/w"):
        integrity.verify_checksums(bad, record, step_dir, trusted_without=False)
    with pytest.raises(integrity.CheckpointDamagedError, match="step 7 has no checksum record"):
        integrity.verify_checksums(tree, None, step_dir, trusted_without=False)


def test_strict_metric_rows_and_truncation_after_resume(tmp_path):
    row = json.loads(metrics_log.strict_json_row({"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "x": 1.0}))
    assert row == {"step": 3, "loss": None, "grad_norm": None, "x": 1.0, "nonfinite": ["loss", "grad_norm"]}
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"step": s, "kind": "train"}) + "\n" for s in range(1, 6)) + '{"step": 6, "ki')
    metrics_log.truncate_metrics(f, 3)
    assert [json.loads(x)["step"] for x in f.read_text().splitlines()] == [1, 2, 3]


# --- damaged checkpoints, pruning, resume ---------------------------------------------------------------------


def _damage_random(step_dir, rng, key=b"params.token_embedder.embedding/0.0"):
    """4 KiB of random bytes written in place (same file size) over the middle of one array's stored chunk, found
    through the checkpoint's own key-value store, so the damage is in parameters that dss-eval reads too."""
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{step_dir / 'state'}/"}).result()
    raw = kv.read(key).result().value
    for f in (p for p in (step_dir / "state").rglob("*") if p.is_file()):
        data = f.read_bytes()
        at = data.find(raw)
        if at >= 0:
            with open(f, "r+b") as h:
                h.seek(at + len(raw) // 2 - 2048)
                h.write(rng.bytes(4096))
            assert f.stat().st_size == len(data)
            return
    raise AssertionError(f"chunk {key} not found under {step_dir}")


def _truncate(step_dir):
    f = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(f, "r+b") as h:
        h.truncate(f.stat().st_size // 2)


_RESTORE_EACH = """
import sys
from pathlib import Path
from dss_jax import checkpoints, integrity, logs
logs.setup_logging()  # as dss-eval: absl/orbax at ERROR
for d in sys.argv[1:]:
    try:
        checkpoints.restore_train_params(Path(d) / "checkpoints" / "7", checkpoints.read_config(d))
        print("restored", file=sys.stderr)
    except integrity.CheckpointDamagedError as e:
        print(f"damaged: {e}", file=sys.stderr)
"""


@pytest.mark.slow
def test_damaged_checkpoint_metadata_is_one_line_without_a_traceback(tmp_path):
    """Random bytes over a step's metadata rather than an array's values: the OCDBT manifest, the b-tree node that
    indexes every array, a chunk's header. Orbax returns None metadata for the first two (it logs and does not
    raise) and TensorStore's abandoned reads print "Event loop is closed" tracebacks; each case must be one line
    naming the damaged step and the intact one, and stderr nothing else."""
    import shutil

    import tensorstore as ts
    from flax import linen as nn

    from dss_jax.params import abstract_boxed_params

    cfg = configs.model_config("t5_1_1_tiny", dtype="float32", vocab_size=64)
    rng = np.random.default_rng(0)
    abstract = nn.meta.unbox(abstract_boxed_params(cfg))
    tree = {"params": jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)}
    base = tmp_path / "base"
    with ocp.CheckpointManager(base / "checkpoints") as mgr:
        for step in (6, 7):
            args = {
                "state": ocp.args.StandardSave(tree),
                integrity.CHECKSUM_ITEM: ocp.args.JsonSave(integrity.checksum_record(tree)),
            }
            mgr.save(step, args=ocp.args.Composite(**args))
    (base / checkpoints.CONFIG_FILE).write_text(json.dumps(cfg.to_dict()))

    def overwrite(f, at, n):
        with open(f, "r+b") as h:
            h.seek(at)
            h.write(rng.bytes(n))

    state = base / "checkpoints" / "7" / "state"
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state}/"}).result()
    chunk = kv.read(b"params.token_embedder.embedding/0.0").result().value
    holder = next(p for p in (state / "ocdbt.process_0" / "d").iterdir() if chunk in p.read_bytes())
    cases = {
        "manifest": lambda s: overwrite(s / "manifest.ocdbt", 0, (s / "manifest.ocdbt").stat().st_size),
        "btree": lambda s: [overwrite(f, f.stat().st_size // 2, 256) for f in (s / "d").iterdir()],
        "chunk_header": lambda s: overwrite(s / holder.relative_to(state), holder.read_bytes().find(chunk), 64),
    }
    dirs = []
    for name, damage in cases.items():
        shutil.copytree(base, tmp_path / name)
        damage(tmp_path / name / "checkpoints" / "7" / "state")
        dirs.append(str(tmp_path / name))
    r = subprocess.run([sys.executable, "-c", _RESTORE_EACH, *dirs], env=xla_env(1), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == len(cases), r.stderr[-3000:]  # one line per damaged step and nothing else
    for name, line in zip(cases, lines, strict=True):
        assert line.startswith("damaged: checkpoint step 7 is damaged"), (name, line)
        assert f"dss-eval --checkpoint={tmp_path / name / 'checkpoints' / '6'}" in line, (name, line)


_ABANDONED_READ = """
import asyncio, gc, sys
from dss_jax import integrity

class Pending:
    def __await__(self):
        yield

async def _read_array_index_and_device_put():  # Orbax's read: every BaseException, GeneratorExit too, re-raised
    try:
        await Pending()
    except BaseException as e:
        raise Exception("Encountered error while reading array index: (slice(0, 64, 1),). See full TensorStore") from e

class Unrelated:
    def __del__(self):
        raise ValueError("an unrelated error in a finalizer")

async def sibling_read():  # a read that failed too, its task never awaited once the first error was raised
    raise ValueError('OUT_OF_RANGE: Error reading "params.x/0.0" in OCDBT database: Requested byte range is not valid')

async def wrapped_read():  # Orbax's wrapper of a failed read, as its sibling tasks end
    raise Exception("Encountered error while reading array index: (slice(0, 32, 1),). See full TensorStore details")

async def gathered_reads():  # Orbax gathers its reads; the gather is dropped unawaited once one read failed
    global gathered
    gathered = asyncio.gather(wrapped_read_64())
    await asyncio.sleep(0.01)

async def wrapped_read_64():
    raise Exception("Encountered error while reading array index: (slice(0, 64, 1),). See full TensorStore details")

async def unrelated_task():
    raise ValueError("an unrelated task error")

integrity._quiet_abandoned_reads()
read = _read_array_index_and_device_put()
read.send(None)  # in flight when the restore gave up on it
del read
Unrelated()
loop = asyncio.new_event_loop()
tasks = [loop.create_task(f()) for f in (sibling_read, wrapped_read, unrelated_task)]
loop.run_until_complete(gathered_reads())
del tasks, gathered  # collected unretrieved: asyncio logs each
loop.close()
gc.collect()
print("done", file=sys.stderr)
"""


def test_reads_abandoned_after_a_damaged_read_print_nothing():
    """No traceback follows dss-eval's one-line error. Orbax's read coroutines still in
    flight when one read fails are finalized later, and each turns the GeneratorExit thrown into it into a new
    "Encountered error while reading array index" exception, printed through sys.unraisablehook with a TensorStore
    spec. Sibling read tasks, and gathers of reads, that failed too are logged by asyncio as never retrieved.
    Exactly those are dropped; other unraisable errors and other tasks' errors still print."""
    r = subprocess.run([sys.executable, "-c", _ABANDONED_READ], env=xla_env(1), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "done" in r.stderr, r.stderr[-3000:]
    assert "Encountered error while reading array index" not in r.stderr, r.stderr[-3000:]
    assert "an unrelated error in a finalizer" in r.stderr, r.stderr[-3000:]
    assert "OUT_OF_RANGE" not in r.stderr and "(slice(0, 32, 1),)" not in r.stderr, r.stderr[-3000:]
    assert "_GatheringFuture" not in r.stderr and "(slice(0, 64, 1),)" not in r.stderr, r.stderr[-3000:]
    assert "an unrelated task error" in r.stderr, r.stderr[-3000:]


@pytest.mark.slow
def test_damaged_steps_are_named_skipped_and_redone(tmp_path, toy_jsonl):
    """Three damaged steps, each its own way; the run resumes from the newest intact one and ends where the
    undamaged run ended, with no traceback. A ``data/<step>/`` deleted whole is damage like a missing file."""
    run = tmp_path / "run"
    cmd = train_cmd(
        run,
        toy_jsonl,
        "--gin.TRAIN_STEPS=6",
        "--gin.train.train.checkpoint_every=1",
        "--gin.train.train.keep_checkpoints=4",
        "--gin.train.train.eval_every=3",
        "--gin.train.train.evaluate_test=False",
    )
    r = subprocess.run(cmd, env=xla_env(1), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = run / "checkpoints"
    kept = _steps(ckpts)
    assert kept == [3, 4, 5, 6], kept  # keep 4 (the best, at step 3 or 6, among them)
    # data positions (35 MB each here, 1 MB checkpoints) live and die with their checkpoints
    assert _steps(run / "data") == kept
    want = {jax.tree_util.keystr(k): np.asarray(v) for k, v in _leaves(_params(ckpts / "6"))}

    rng = np.random.default_rng(0)
    _damage_random(ckpts / "6", rng)  # garbage values, or a zstd error without a name
    _truncate(ckpts / "5")  # a partial file: TensorStore errors without a name
    shutil.rmtree(run / "data" / "4")  # the data position of an intact state

    ev = subprocess.run(
        [sys.executable, "-m", "dss_jax.evaluate", f"--model_dir={run}", f"--checkpoint={ckpts / '6'}"],
        env=xla_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ev.returncode == 2, ev.stderr[-3000:]
    errors = [line for line in ev.stderr.splitlines() if line.startswith("dss-eval: error")]
    # one line and no traceback, wherever the random bytes land (array values or metadata, as in the test above)
    assert len(errors) == 1 and "Traceback" not in ev.stderr, ev.stderr[-3000:]
    # dss-eval reads parameters only: when the truncated file of step 5 holds only optimizer state (the file layout
    # varies between runs), step 5 is intact for evaluation and is the one suggested
    assert "step 6 is damaged" in errors[0], errors[0]
    assert any(f"--checkpoint={ckpts / s}" in errors[0] for s in ("4", "5")), errors[0]

    r = subprocess.run(cmd, env=xla_env(1), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 6 is damaged" in r.stderr and "step 5 is damaged" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "step 4" in r.stderr and "is missing" in r.stderr, r.stderr[-3000:]
    fallback = [line for line in r.stderr.splitlines() if "resuming from step 3, the newest intact checkpoint" in line]
    assert len(fallback) == 1 and "6, 5, 4" in fallback[0], r.stderr[-3000:]
    assert sorted(p.name.split("-")[0] for p in (run / "damaged").iterdir()) == ["4", "5", "6"]
    # steps 4 to 6 redone from step 3 end exactly where the undamaged run ended
    got = {jax.tree_util.keystr(k): np.asarray(v) for k, v in _leaves(_params(ckpts / "6"))}
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    rows = _strict_rows(run)
    keys = [(row["step"], row["kind"]) for row in rows]
    assert len(keys) == len(set(keys)), keys  # each step once after the resume
    assert [s for s, k in keys if k == "train"] == list(range(1, 7))
    assert _steps(run / "data") == _steps(ckpts)


def test_data_iterator_state_is_compressed_and_resumes_exactly(tmp_path):
    """A shuffle buffer far larger than its input (as the paired DSS tasks' 100k over a few thousand rows): tf.data
    writes every slot; the saved state is gzipped, resumes with the very next batches, and states written before
    (uncompressed) still restore."""
    import tensorflow as tf

    from dss_jax.tasks import pipeline

    def make():
        ds = tf.data.Dataset.range(300).map(lambda i: {"x": tf.fill([8], i)})
        return pipeline.BatchIterator(ds.shuffle(20_000, seed=3, reshuffle_each_iteration=True).repeat().batch(16))

    it = make()
    for _ in range(25):  # past the first epoch's end
        next(it)
    it._ckpt.write(str(tmp_path / "legacy" / "process_0"))  # the legacy, uncompressed format
    it.save(str(tmp_path / "s" / "process_0"))
    expected = [next(it)["x"] for _ in range(30)]
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert files == ["process_0.data-00000-of-00001.gz", "process_0.index.gz"], files  # no temporary left
    size = sum(p.stat().st_size for p in (tmp_path / "s").iterdir())
    raw_size = sum(p.stat().st_size for p in (tmp_path / "legacy").iterdir())
    assert size * 10 < raw_size, (size, raw_size)
    for d in ("s", "legacy"):
        resumed = make()
        resumed.restore(str(tmp_path / d / "process_0"))
        for want in expected:
            np.testing.assert_array_equal(next(resumed)["x"], want)


@pytest.mark.slow
def test_a_long_run_keeps_data_states_only_for_kept_checkpoints(tmp_path, toy_jsonl):
    """10k steps with checkpoint_every 500 and keep 2, scaled down: 20 steps, a checkpoint every 2, keep 2 (+ the
    best on validation): 10 saves leave at most 3 data-iterator states, each beside its checkpoint (35 MB each for
    this toy run: they are pruned with their checkpoints)."""
    run = tmp_path / "long"
    cmd = train_cmd(
        run,
        toy_jsonl,
        "--gin.TRAIN_STEPS=20",
        "--gin.train.train.checkpoint_every=2",
        "--gin.train.train.keep_checkpoints=2",
        "--gin.train.train.eval_every=10",
        "--gin.train.train.log_every=10",
        "--gin.train.train.evaluate_test=False",
    )
    r = subprocess.run(cmd, env=xla_env(1), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    kept = _steps(run / "checkpoints")
    assert kept[-2:] == [18, 20] and len(kept) <= 3, kept  # keep 2 + the best
    assert _steps(run / "data") == kept
    for s in kept:  # each kept state is whole: its files and their digest record
        files = {p.name for p in (run / "data" / str(s)).iterdir()}
        assert "process_0.sha256.json" in files and any(f.startswith("process_0_") for f in files), files


# --- divergence -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_divergence_stops_before_a_bad_state_is_saved(tmp_path, toy_jsonl):
    run = tmp_path / "diverge"
    cmd = train_cmd(
        run,
        toy_jsonl,
        "--gin.TRAIN_STEPS=8",
        "--gin.train.train.checkpoint_every=1",
        "--gin.train.train.eval_every=1",
        "--gin.train.train.evaluate_test=False",
        "--gin.optim.learning_rate_schedule.base_learning_rate=1e30",
        "--gin.optim.make_optimizer.grad_clip_norm=None",
    )
    r = subprocess.run(cmd, env=xla_env(1), capture_output=True, text=True, timeout=900)
    assert r.returncode == 3, r.stderr[-3000:]
    rows = [row for row in _strict_rows(run) if row["kind"] == "train"]
    bad = [row["step"] for row in rows if row.get("nonfinite")]
    first = bad[0]  # the step that diverged, from the metrics themselves
    assert all(np.isfinite(row["grad_norm"]) and np.isfinite(row["loss"]) for row in rows if row["step"] < first)
    last = r.stderr.strip().splitlines()[-1]  # one line: the step, what diverged, where the last good state is
    assert re.fullmatch(r"dss-train: at step \d+ .+ not finite; stopping before that state is saved or evaluated\. .+", last)
    assert f"at step {first} " in last and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"The last good checkpoint is step {first - 1} " in last, r.stderr[-2000:]
    saved = _steps(run / "checkpoints")
    assert saved and max(saved) == first - 1, saved
    best = ocp.CheckpointManager(
        run / "checkpoints",
        options=ocp.CheckpointManagerOptions(read_only=True, best_fn=lambda m: m["accuracy"], best_mode="max"),
    ).best_step()
    assert best is not None and best in saved and best < first, (best, saved)  # keep-best saw the good steps' metrics
    for s in saved:  # latest, best and everything else on disk is finite
        assert all(np.isfinite(np.asarray(v)).all() for _, v in _leaves(_params(run / "checkpoints" / str(s))))


def test_skip_mode_leaves_the_state_as_it_was_and_flags_the_step():
    """The pure train step: with a huge learning rate step 1 still lands on finite (huge) parameters and step 2
    overflows; in skip mode step 2's update is dropped, so parameters and optimizer state stay bit for bit."""
    from dss_jax import losses, optim, partitioning, trainer

    cfg = tiny_t5(vocab_size=64)
    tx = optim.make_optimizer(name="adamw", learning_rate=1e30, grad_clip_norm=None)
    mesh_cfg = partitioning.MeshConfig(data=1, fsdp=1, model=1)
    mesh = partitioning.make_mesh(mesh_cfg)
    layout = trainer.state_layout(cfg, tx, mesh, mesh_cfg.rules)
    bsh = partitioning.batch_sharding(mesh, mesh_cfg.rules)
    rng = np.random.RandomState(0)
    tgt = rng.randint(2, 64, size=(2, 8)).astype(np.int32)
    batch = {
        "encoder_input_tokens": rng.randint(2, 64, size=(2, 8)).astype(np.int32),
        "decoder_target_tokens": tgt,
        "decoder_input_tokens": np.concatenate([np.zeros((2, 1), np.int32), tgt[:, :-1]], 1),
        "decoder_loss_weights": np.ones_like(tgt),
        "decoder_task_ids": np.ones_like(tgt),
    }
    step = trainer.jit_train_step(cfg, tx, losses.LossConfig(), 1, 0, layout, bsh, mesh, skip_nonfinite=True)
    acc = jnp.zeros((3,), jnp.int32)
    with jax.set_mesh(mesh):
        state = trainer.init_state(cfg, tx, layout, 0)
        gb = partitioning.global_batch(batch, bsh)
        state, m1 = step(state, gb)
        acc = trainer.track_nonfinite(acc, m1["nonfinite"], 1)
        before = jax.device_get((state.params, state.opt_state))
        state, m2 = step(state, gb)
        acc = trainer.track_nonfinite(acc, m2["nonfinite"], 2)
        after = jax.device_get((state.params, state.opt_state))
    assert int(m1["nonfinite"]) == 0 and int(m2["nonfinite"]) > 0
    assert int(state.step) == 2  # the step counts (data and dropout move on); the update does not
    for (k, a), (_, b) in zip(_leaves(before), _leaves(after), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(k))
    assert all(np.isfinite(np.asarray(v)).all() for _, v in _leaves(after[0]))
    first, flags, count = (int(x) for x in acc)
    assert (first, count) == (2, 1) and "not finite" in trainer.describe_nonfinite(flags)
    # in stop mode a run that diverges before its first checkpoint says so (the CLI test above has one saved)
    from dss_jax import train

    msg = str(train.nonfinite_error(first, flags, -1, Path("run/checkpoints")))
    assert msg.startswith("at step 2 ") and "No checkpoint was saved (lower the learning rate" in msg, msg
