#!/usr/bin/env python3
"""Run a dss_jax gin job on every host of a Cloud TPU VM slice.

    pip install -e '.[launch]'     # the sdist build step needs the `build` frontend
    python launch/tpu_vm.py --name dss-v4-64 --zone us-central2-b --accelerator_type v4-64 \
        [--version RUNTIME] [--queued --spot] [--dry_run] -- \
        dss-train --gin_file=runs/dss.gin --gin_file=partitioning/xxl.gin --model_dir=gs://bucket/outputs/cqa_xxl ...

Steps: create the TPU VM (or a queued resource) unless it exists; build an sdist of this checkout and copy it
to every worker; install it with the ``tpu`` extra; run the command on all workers at once with
DSS_AUTO_DISTRIBUTED=1 (jax.distributed finds the pod); stream each worker's output into
``--log_dir/step_<i>.log``. ``--dry_run`` prints every gcloud command instead of running it.
The runtime (software) version defaults to the one Cloud TPU documents for JAX on the accelerator's generation
(``RUNTIME_VERSIONS``); the package version is read from ``dss_jax/__init__.py``.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Cloud TPU's documented software versions for JAX/PyTorch, per generation (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {
    "v6e": "v2-alpha-tpuv6e",
    "v5p": "v2-alpha-tpuv5",
    "v5e": "v2-alpha-tpuv5-lite",
    "v4": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v2": "tpu-ubuntu2204-base",
}


def generation(accelerator_type: str) -> str:
    """'v5litepod-16' -> 'v5e', 'v5p-32' -> 'v5p', 'v6e-8' -> 'v6e', 'v4-64' -> 'v4'."""
    m = re.fullmatch(r"(v\d+)(litepod|lite|e|p)?-\d+", accelerator_type)
    if not m:
        raise ValueError(f"accelerator type {accelerator_type!r} is not like v4-8, v5litepod-16, v5p-32, v6e-8")
    base, kind = m.groups()
    return base + ("e" if kind in ("litepod", "lite", "e") else kind or "")


def runtime_version(accelerator_type: str) -> str:
    gen = generation(accelerator_type)
    if gen not in RUNTIME_VERSIONS:
        raise ValueError(f"no documented runtime for {gen} ({accelerator_type}); pass --version")
    return RUNTIME_VERSIONS[gen]


def package_version() -> str:
    """The version in dss_jax/__init__.py (setup.py reads the same line), without importing dss_jax."""
    text = (REPO / "dss_jax" / "__init__.py").read_text()
    m = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if not m:
        raise RuntimeError("dss_jax/__init__.py has no __version__ line")
    return m.group(1)


def _gcloud(*args: str, project: str | None, zone: str) -> list[str]:
    cmd = ["gcloud", *args, f"--zone={zone}"]
    return cmd + ([f"--project={project}"] if project else [])


def plan_commands(a: argparse.Namespace, job: list[str]) -> list[tuple[str, list[str]]]:
    """(description, argv) of every step, in order."""
    tpu = ["compute", "tpus", "tpu-vm"]
    version = a.version or runtime_version(a.accelerator_type)
    steps: list[tuple[str, list[str]]] = []
    if a.queued:
        create = [
            "compute",
            "tpus",
            "queued-resources",
            "create",
            a.name,
            f"--node-id={a.name}",
            f"--accelerator-type={a.accelerator_type}",
            f"--runtime-version={version}",
        ]
        create += ["--spot"] if a.spot else []
    else:
        create = [*tpu, "create", a.name, f"--accelerator-type={a.accelerator_type}", f"--version={version}"]
        create += ["--spot"] if a.spot else []
    steps.append(("create the TPU VM unless it exists", _gcloud(*create, project=a.project, zone=a.zone)))
    dist = Path(a.dist_dir).resolve()
    sdist = dist / f"dss_jax-{package_version()}.tar.gz"
    steps.append(("build the package", sdist_command(dist)))
    steps.append(
        (
            "copy it to every worker",
            _gcloud(*tpu, "scp", str(sdist), f"{a.name}:~/", "--worker=all", project=a.project, zone=a.zone),
        )
    )
    install = f'pip install -q "$HOME/{Path(sdist).name}[tpu]"'
    steps.append(
        (
            "install it with the tpu extra",
            _gcloud(*tpu, "ssh", a.name, "--worker=all", f"--command={install}", project=a.project, zone=a.zone),
        )
    )
    run = "DSS_AUTO_DISTRIBUTED=1 " + shlex.join(job)
    steps.append(
        (
            "run the job on all workers",
            _gcloud(*tpu, "ssh", a.name, "--worker=all", f"--command={run}", project=a.project, zone=a.zone),
        )
    )
    return steps


def sdist_command(dist: Path) -> list[str]:
    """How the launcher builds the sdist it ships (the `build` frontend, from the `launch` extra)."""
    return [sys.executable, "-m", "build", "--sdist", "--outdir", str(dist), str(REPO)]


def exists(a: argparse.Namespace) -> bool:
    cmd = _gcloud("compute", "tpus", "tpu-vm", "describe", a.name, project=a.project, zone=a.zone)
    return subprocess.run(cmd, capture_output=True).returncode == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--zone", required=True)
    p.add_argument("--accelerator_type", required=True, help="e.g. v4-8, v4-64, v5litepod-16, v5p-32")
    p.add_argument("--version", default=None, help="TPU VM runtime version (default: the documented one for the generation)")
    p.add_argument("--project", default=None)
    p.add_argument("--queued", action="store_true", help="create through a queued resource")
    p.add_argument("--spot", action="store_true")
    p.add_argument("--log_dir", default="logs/tpu")
    p.add_argument("--dist_dir", default=str(REPO / "dist"), help="where the sdist is built")
    p.add_argument("--dry_run", action="store_true", help="print the gcloud commands, run nothing")
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    job = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not job:
        p.error("give the job after --, e.g. -- dss-train --gin_file=runs/dss.gin ...")
    try:
        steps = plan_commands(a, job)
    except ValueError as e:
        p.error(str(e))
    if a.dry_run:
        for desc, cmd in steps:
            print(f"# {desc}\n{shlex.join(cmd)}")
        return 0
    Path(a.log_dir).mkdir(parents=True, exist_ok=True)
    if subprocess.run([sys.executable, "-c", "import build"], capture_output=True).returncode != 0:
        print("tpu_vm.py: the `build` package is missing: pip install -e '.[launch]'", file=sys.stderr)
        return 2
    for i, (desc, cmd) in enumerate(steps):
        if i == 0 and exists(a):
            print(f"{a.name} exists: reusing it", file=sys.stderr)
            continue
        print(f"== {desc}: {shlex.join(cmd)}", file=sys.stderr)
        log = Path(a.log_dir) / f"step_{i}.log"
        with open(log, "w") as f:
            # gcloud prefixes each worker's lines with its address; the log keeps all workers' output
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                sys.stdout.write(line)
                f.write(line)
            if proc.wait() != 0:
                print(f"step failed ({desc}); log: {log}", file=sys.stderr)
                return proc.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
