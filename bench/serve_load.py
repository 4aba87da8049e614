"""A bounded load against dss-serve on loopback: requests/s, latency percentiles and batch fill; prints JSON.

    python bench/serve_load.py --model_dir outputs/quickstart/dss --requests 500 --concurrency 32 \
        [--max_batch 16] [--max_wait_ms 5] [--benchmark esnli] [--rationale]

Starts ``dss-serve`` on a free 127.0.0.1 port with the given batching settings, sends ``--requests`` completions
(``--concurrency`` in flight at a time, each a real validation input of ``--benchmark``, cycled), and reads the
server's own counters from ``/health`` afterwards. Latency is per request, from send to full response, measured
on the client; the first requests (jit compiles of each batch shape) are sent as a warm-up and not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts(benchmark: str) -> list[dict]:
    from dss_jax.tasks import readers

    rows = readers.read_split(readers.default_data_dir(), benchmark, "validation")
    return [{"prompt": e.input, **({"input_b": e.input_b} if e.input_b else {})} for e in rows]


async def _load(base: str, model: str, prompts: list[dict], n: int, concurrency: int, rationale: bool) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal errors
        body = {"model": model, "max_tokens": 16, **prompts[i % len(prompts)], "rationale": rationale}
        async with sem:
            t = time.perf_counter()
            r = await client.post(f"{base}/v1/completions", json=body)
            latencies.append(time.perf_counter() - t)
            errors += r.status_code != 200

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(n)))
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {
        "requests": n,
        "concurrency": concurrency,
        "wall_s": round(wall, 2),
        "requests_per_s": round(n / wall, 2),
        "latency_ms": {q: round(float(np.percentile(ms, p)), 1) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))},
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="a dss-train model dir (e.g. outputs/quickstart/dss)")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max_batch", type=int, default=16)
    p.add_argument("--max_wait_ms", type=float, default=5.0)
    p.add_argument("--benchmark", default="esnli", help="whose validation inputs to send")
    p.add_argument("--rationale", action="store_true", help="ask for the rationale too (two decodes per request)")
    p.add_argument("--warmup", type=int, default=64)
    a = p.parse_args(argv)
    import httpx

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "dss_jax.serve", f"--model_dir={a.model_dir}", f"--port={port}"]
    cmd += [f"--max_batch={a.max_batch}", f"--max_wait_ms={a.max_wait_ms}", "--model_name=student"]
    server = subprocess.Popen(cmd, env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                print("serve_load: dss-serve did not come up", file=sys.stderr)
                return 2
            time.sleep(1)
        prompts = _prompts(a.benchmark)
        asyncio.run(_load(base, "student", prompts, a.warmup, a.concurrency, a.rationale))  # compiles
        before = httpx.get(f"{base}/health").json()
        result = asyncio.run(_load(base, "student", prompts, a.requests, a.concurrency, a.rationale))
        after = httpx.get(f"{base}/health").json()
        rows, batches = after["rows"] - before["rows"], after["batches"] - before["batches"]
        result.update(
            max_batch=a.max_batch,
            max_wait_ms=a.max_wait_ms,
            rationale=a.rationale,
            batches=batches,
            batch_fill=round(rows / max(1, batches * a.max_batch), 3),
            model_dir=str(a.model_dir),
        )
        print(json.dumps(result, indent=2))
        return 0 if result["errors"] == 0 else 1
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
