"""Nothing is lost on interruption: SIGKILL or SIGTERM, then the same command, ends where an uninterrupted
run ends (same parameters, same data order); a non-finite loss stops the run and keeps good checkpoints."""

import json
import re
import signal
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import train_cmd, xla_env

pytestmark = pytest.mark.slow  # trains models or runs CLIs in subprocesses


def _cmd(model_dir, toy, *extra):
    return train_cmd(model_dir, toy, "--gin.train.train.evaluate_test=False", *extra)


def _params(model_dir, step):
    restored = ocp.StandardCheckpointer().restore(model_dir / "checkpoints" / str(step) / "state")
    return restored["params"]


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = np.asarray(v)
    return out


def _train_steps_logged(model_dir):
    f = model_dir / "metrics.jsonl"
    if not f.exists():
        return 0
    return sum(1 for line in f.read_text().splitlines() if '"kind": "train"' in line)


def _run_until(cmd, model_dir, steps, sig):
    p = subprocess.Popen(cmd, env=xla_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while _train_steps_logged(model_dir) < steps and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, f"run ended before it could be interrupted:\n{p.stdout.read()}"
    p.send_signal(sig)
    out, _ = p.communicate(timeout=120)
    return p.returncode, out


def test_sigterm_then_sigkill_then_rerun_equals_uninterrupted(tmp_path, toy_jsonl):
    """SIGTERM saves at that step and exits 0, and the rerun resumes there; SIGKILL mid-run then loses nothing
    committed; the last rerun ends where an uninterrupted run ends (same parameters, same losses)."""
    ref = tmp_path / "ref"
    r = subprocess.run(_cmd(ref, toy_jsonl), env=xla_env(1), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    run = tmp_path / "interrupted"
    cmd = _cmd(run, toy_jsonl, "--gin.train.train.checkpoint_every=100")  # only SIGTERM and the end save
    code, out = _run_until(cmd, run, 3, signal.SIGTERM)
    assert code == 0, out[-3000:]
    termed = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert termed and 3 <= termed[-1] < 20, termed
    code, out = _run_until(cmd, run, 12, signal.SIGKILL)
    assert code == -signal.SIGKILL and f"at step {termed[-1]}" in out, out[-3000:]
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < 20  # it really died mid-run
    r = subprocess.run(cmd, env=xla_env(1), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr

    a, b = _flat(_params(ref, 20)), _flat(_params(run, 20))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the resumed runs saw the same batches: the logged losses equal the reference's
    ref_losses, run_losses = (
        {r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"}
        for d in (ref, run)
    )
    assert run_losses == ref_losses


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, toy_jsonl):
    run = tmp_path / "nan"
    r = subprocess.run(
        _cmd(
            run,
            toy_jsonl,
            "--gin.optim.learning_rate_schedule.base_learning_rate=1e30",
            "--gin.optim.make_optimizer.grad_clip_norm=None",
        ),
        env=xla_env(1),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 3, r.stderr[-2000:]
    saved = [p for p in (run / "checkpoints").iterdir() if p.name.isdigit()] if (run / "checkpoints").exists() else []
    last = r.stderr.strip().splitlines()[-1]  # one line: the step, what diverged, where the last good state is
    assert re.fullmatch(r"dss-train: at step \d+ .+ not finite; stopping before that state is saved or evaluated\. .+", last)
    kept = f"The last good checkpoint is step {max(int(p.name) for p in saved)} " if saved else "No checkpoint was saved"
    assert kept in last and "Traceback" not in r.stderr, r.stderr[-2000:]
    for p in saved:  # whatever was kept holds finite parameters
        assert all(np.isfinite(v).all() for v in _flat(_params(run, int(p.name))).values())


def test_one_writer_per_model_dir_and_a_killed_holder_never_blocks(tmp_path, toy_jsonl):
    """A second dss-train on a model dir in use stops at once with one line naming the holder, and changes nothing
    there; once the holder is SIGKILLed (its flock dies with it) the next run takes the dir and resumes."""
    run = tmp_path / "shared"
    first = subprocess.Popen(
        _cmd(run, toy_jsonl, "--gin.TRAIN_STEPS=100000", "--gin.train.train.eval_every=0"),
        env=xla_env(1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while _train_steps_logged(run) < 6 and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()[-3000:]
        before = {p: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file() and p.name != "metrics.jsonl"}
        second = subprocess.run(_cmd(run, toy_jsonl), env=xla_env(1), capture_output=True, text=True, timeout=180)
        assert second.returncode == 2, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert lines[-1].startswith("dss-train: error: ") and f"pid {first.pid} on host " in lines[-1], second.stderr
        assert " since " in lines[-1] and "Traceback" not in second.stderr
        assert first.poll() is None  # the holder trains on, its run files untouched by the second
        assert {p: p.stat().st_mtime_ns for p in before} == before
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved
    r = subprocess.run(
        _cmd(run, toy_jsonl, f"--gin.TRAIN_STEPS={saved[-1] + 2}", "--gin.train.train.eval_every=0"),
        env=xla_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr, r.stderr[-3000:]
