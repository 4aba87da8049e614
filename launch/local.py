#!/usr/bin/env python3
"""Run one dss_jax job as several local processes that form one multi-host JAX cluster.

    python launch/local.py --num_processes 2 --devices_per_process 4 --log_dir /tmp/logs -- \
        dss-train --gin_file=runs/quickstart.gin --model_dir=/tmp/mh

Each process gets DSS_COORDINATOR_ADDRESS / DSS_NUM_PROCESSES / DSS_PROCESS_ID (read by
``dss_jax.partitioning.maybe_initialize_distributed``), its own CPU devices, and a log file; the launcher
waits for all, prints each failing process's log tail, and exits non-zero if any failed. This is the
rehearsal of a pod on one machine: same code path as TPU VMs, with CPU collectives (gloo).
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def xla_flags(flags: str, devices: int) -> str:
    """The caller's XLA_FLAGS with this process's CPU device count (any other count replaced, every other flag kept)."""
    count = "--xla_force_host_platform_device_count"
    kept = [f for f in flags.split() if not f.startswith(count)]
    return " ".join([f"{count}={devices}", *kept])


def launch(command: list[str], num_processes: int, devices_per_process: int, log_dir: Path, timeout: float) -> int:
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for i in range(num_processes):
        env = dict(os.environ)
        env.update(
            DSS_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            DSS_NUM_PROCESSES=str(num_processes),
            DSS_PROCESS_ID=str(i),
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=xla_flags(os.environ.get("XLA_FLAGS", ""), devices_per_process),
        )
        log = open(log_dir / f"process_{i}.log", "w")
        procs.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.time() + timeout
    codes = [None] * num_processes
    while any(c is None for c in codes):
        for i, (p, _) in enumerate(procs):
            codes[i] = p.poll()
        if any(c not in (None, 0) for c in codes) or time.time() > deadline:
            for p, _ in procs:  # one failed (or time ran out): the others would wait for it forever
                if p.poll() is None:
                    p.terminate()
            for i, (p, _) in enumerate(procs):
                codes[i] = p.wait(timeout=60)
            break
        time.sleep(0.2)
    for _, log in procs:
        log.close()
    for i, c in enumerate(codes):
        if c != 0:
            tail = (log_dir / f"process_{i}.log").read_text().splitlines()[-30:]
            print(f"process {i} exited {c}; last lines of {log_dir}/process_{i}.log:\n" + "\n".join(tail), file=sys.stderr)
    return 0 if all(c == 0 for c in codes) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_processes", type=int, default=2)
    p.add_argument("--devices_per_process", type=int, default=4)
    p.add_argument("--log_dir", default="logs/local")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every process runs")
    a = p.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        p.error("give the command after --")
    print(f"launching {a.num_processes} x {shlex.join(cmd)}", file=sys.stderr)
    return launch(cmd, a.num_processes, a.devices_per_process, Path(a.log_dir), a.timeout)


if __name__ == "__main__":
    sys.exit(main())
