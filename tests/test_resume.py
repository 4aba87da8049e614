"""Nothing is lost on interruption: SIGKILL or SIGTERM, then the same command, ends where an uninterrupted
run ends (same parameters, same data order); one writer per model dir. (A non-finite loss: test_reliability.)"""

import json
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


def _start_until(cmd, model_dir, steps):
    """A dss-train process, returned once it has logged ``steps`` train steps and still runs."""
    p = subprocess.Popen(cmd, env=xla_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while _train_steps_logged(model_dir) < steps and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, f"run ended before it could be interrupted:\n{p.stdout.read()}"
    return p


def test_sigterm_then_sigkill_then_rerun_equals_uninterrupted(tmp_path, toy_jsonl):
    """SIGTERM saves at that step and exits 0, and the rerun resumes there. While that rerun holds the model dir,
    a second dss-train on it stops at once with one line naming the holder and changes nothing there. SIGKILL then
    loses nothing committed, and the holder's flock dies with it: the last rerun takes the dir and ends where an
    uninterrupted run ends (same parameters, same losses)."""
    ref = tmp_path / "ref"
    r = subprocess.run(_cmd(ref, toy_jsonl), env=xla_env(1), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    run = tmp_path / "interrupted"
    cmd = _cmd(run, toy_jsonl, "--gin.train.train.checkpoint_every=100")  # only SIGTERM and the end save
    termer = _start_until(cmd, run, 3)
    termer.send_signal(signal.SIGTERM)
    out, _ = termer.communicate(timeout=120)
    assert termer.returncode == 0, out[-3000:]
    termed = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert termed and 3 <= termed[-1] < 20, termed

    holder = _start_until(cmd, run, 12)
    holder.send_signal(signal.SIGSTOP)  # paused mid-run: it keeps the dir's lock and writes nothing meanwhile
    try:
        before = {f: f.stat().st_mtime_ns for f in run.rglob("*") if f.is_file()}
        second = subprocess.run(cmd, env=xla_env(1), capture_output=True, text=True, timeout=180)
        assert second.returncode == 2, second.stderr[-3000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("dss-train: error: ") and f"pid {holder.pid} on host " in last, second.stderr
        assert " since " in last and "Traceback" not in second.stderr
        assert holder.poll() is None  # the refused run left the holder alive, and its files untouched:
        assert {f: f.stat().st_mtime_ns for f in run.rglob("*") if f.is_file()} == before  # nothing written or added
    finally:
        holder.kill()
        out, _ = holder.communicate(timeout=120)
    assert holder.returncode == -signal.SIGKILL and f"at step {termed[-1]}" in out, out[-3000:]
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
