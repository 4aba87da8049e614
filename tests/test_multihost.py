"""Two local processes x 2 CPU devices form one 4-device mesh (parameters sharded over both processes, fsdp and
model parallel): training matches the single-process 4-device run (same input shards), and the checkpoint they
wrote restores in one process."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, launcher, train_cmd, xla_env

pytestmark = pytest.mark.slow  # trains models or runs CLIs in subprocesses

MESH = ["--gin.partitioning.MeshConfig.data=1", "--gin.partitioning.MeshConfig.fsdp=2", "--gin.partitioning.MeshConfig.model=2"]


def _train_cmd(model_dir, toy):
    return train_cmd(
        model_dir,
        toy,
        "--gin.TRAIN_STEPS=10",
        "--gin.train.train.checkpoint_every=10",
        "--gin.train.train.eval_every=0",  # no evaluation at all: the test compares losses and checkpoints
        "--gin.train.train.evaluate_test=False",
        "--gin.train.train.input_shards=2",
        *MESH,
    )


def _losses(model_dir):
    rows = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def test_two_processes_match_one_process_and_restore_in_one(tmp_path, toy_jsonl):
    multi, single = tmp_path / "multi", tmp_path / "single"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "local.py"),
            "--num_processes",
            "2",
            "--devices_per_process",
            "2",
            "--log_dir",
            str(tmp_path / "logs"),
            "--timeout",
            "600",
            "--",
            *_train_cmd(multi, toy_jsonl),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    r = subprocess.run(_train_cmd(single, toy_jsonl), env=xla_env(4), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-4)
    assert len(_losses(multi)) == 10
    # each process wrote its own data-iterator position, and its digest (verified at resume)
    from dss_jax.integrity import DATA_DIGEST_SUFFIX

    files = [p.name for p in (multi / "data" / "10").iterdir()]
    written = {n.split(".")[0] for n in files if not n.endswith(DATA_DIGEST_SUFFIX)}
    assert written == {"process_0_shard0", "process_1_shard0"}
    assert {n for n in files if n.endswith(DATA_DIGEST_SUFFIX)} == {f"process_{i}{DATA_DIGEST_SUFFIX}" for i in (0, 1)}

    from dss_jax import checkpoints, convert

    cfg = checkpoints.read_config(multi)
    a = convert.flatten(checkpoints.restore_train_params(multi / "checkpoints" / "10", cfg))
    b = convert.flatten(checkpoints.restore_train_params(single / "checkpoints" / "10", cfg))
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-4, atol=1e-6, err_msg=k)


def test_the_launcher_keeps_the_callers_xla_flags_and_sets_each_process_device_count():
    local = launcher("local")
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    assert local.xla_flags(flags, 2) == "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
    assert local.xla_flags("", 4) == "--xla_force_host_platform_device_count=4"
