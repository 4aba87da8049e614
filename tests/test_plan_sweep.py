"""dss-plan's AOT TPU compile verdicts and the TPU launcher's dry run (dss-sweep and dss-report: test_paper_sweep)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, launcher

pytestmark = pytest.mark.slow  # trains models or runs CLIs in subprocesses

pytest.importorskip("libtpu", reason="dss-plan needs the tpu extra (libtpu)")

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _plan(*args):
    r = subprocess.run(
        [sys.executable, "-m", "dss_jax.plan", "--json", *args], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_plan_reports_a_fit_and_a_non_fit():
    fits = _plan(
        "--model",
        "t5_1_1_tiny",
        "--topology",
        "v4-8",
        "--batch",
        "16",
        "--inputs_length",
        "128",
        "--targets_length",
        "32",
        "--fsdp",
        "4",
    )
    assert [r["fits"] for r in fits] == [True]
    # v4 shows each TensorCore as a device, with half its chip's 32 GiB
    assert (fits[0]["chips"], fits[0]["devices"], fits[0]["hbm_gib_per_device"]) == (4, 8, 16.0)
    assert 0 < fits[0]["peak_gib_per_device"] < fits[0]["hbm_gib_per_device"]
    assert fits[0]["params_gib_per_device"] > 0 and fits[0]["model_flops_per_step_per_device"] > 0
    for r in fits:  # scanned layers: the trip-counted compile exceeds XLA's once-per-loop count; every loop is read
        assert r["loops"] > 0 and r["loops_without_trip_count"] == 0
        assert r["compiled_flops_per_device"] > 1.5 * r["xla_flops_loops_once_per_device"]
        assert r["compiled_over_model_flops"] >= 1.0 and 0 < r["mfu_bound"] <= 1.0 and r["roofline_step_s"] > 0
    big = _plan(
        "--model",
        "t5_1_1_tiny",
        "--topology",
        "v5e-1",
        "--batch",
        "512",
        "--inputs_length",
        "8192",
        "--targets_length",
        "1024",
        "--remat",
        "none",
    )
    assert big[0]["fits"] is False
    assert (big[0]["chips"], big[0]["devices"], big[0]["hbm_gib_per_device"]) == (1, 1, 16.0)  # a v5e chip is one device


def test_plan_rejects_unknown_topologies():
    r = subprocess.run(
        [sys.executable, "-m", "dss_jax.plan", "--model", "t5_1_1_tiny", "--topology", "v9-8"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert r.returncode == 2 and "unknown topology 'v9-8'" in r.stderr


def test_tpu_launcher_dry_run_prints_every_gcloud_step():
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "tpu_vm.py"),
            "--name",
            "dss",
            "--zone",
            "us-central2-b",
            "--accelerator_type",
            "v4-64",
            "--queued",
            "--dry_run",
            "--",
            "dss-train",
            "--gin_file=runs/dss.gin",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr
    cmds = [x for x in r.stdout.splitlines() if not x.startswith("#")]
    assert cmds[0].startswith("gcloud compute tpus queued-resources create dss")
    assert sum("--worker=all" in c for c in cmds) == 3
    assert "DSS_AUTO_DISTRIBUTED=1 dss-train --gin_file=runs/dss.gin" in cmds[-1]


@pytest.mark.parametrize(
    "accel, runtime",
    [
        ("v4-64", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-32", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_tpu_launcher_picks_the_documented_runtime_per_generation(accel, runtime):
    r = subprocess.run(
        [sys.executable, str(REPO / "launch" / "tpu_vm.py"), "--name", "d", "--zone", "z", "--accelerator_type", accel]
        + ["--dry_run", "--", "dss-train"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr
    assert f"--version={runtime}" in r.stdout.splitlines()[1]


def test_tpu_launcher_sdist_installs_into_a_fresh_venv(tmp_path):
    """The sdist the launcher ships, built by its own command, installs with the package, its gin files and CLIs."""
    tpu_vm = launcher("tpu_vm")
    dist = tmp_path / "dist"
    r = subprocess.run(tpu_vm.sdist_command(dist), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    sdist = dist / f"dss_jax-{tpu_vm.package_version()}.tar.gz"
    assert sdist.exists(), sorted(p.name for p in dist.iterdir())
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    r = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(sdist)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    site = next((venv / "lib").glob("python*/site-packages"))
    for rel in (
        "dss_jax/train.py",
        "dss_jax/tasks/registry.py",
        "dss_jax/gin_configs/runs/dss.gin",
        "dss_jax/gin_configs/models/t5_1_1_base.gin",
    ):
        assert (site / rel).exists(), rel
    assert (venv / "bin" / "dss-train").exists() and (venv / "bin" / "dss-eval").exists()
