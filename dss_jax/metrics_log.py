"""What a training run logs: rates that measure only training, and ``metrics.jsonl`` + TensorBoard.

``metrics.jsonl`` is strict JSON (non-finite values become null and are listed) and holds each step once: a
resumed run first drops the rows of the steps it redoes.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from dss_jax.files import atomic_write


class RateMeter:
    """Examples/s and real (non-padding) tokens/s between log steps, measured after the device finished them.

    Reading the metrics at a log step waits for the device, so the window ends where the work ended; time spent
    in evaluation and checkpointing (``paused``) is left out.
    """

    def __init__(self) -> None:
        self.pending: list[dict[str, Any]] = []
        self.t0 = time.time()
        self.excluded = 0.0

    def add(self, metrics: dict[str, Any]) -> None:
        keys = ("label_sequences", "rationale_sequences", "target_tokens", "nonpad_input_tokens")
        self.pending.append({k: metrics[k] for k in keys if k in metrics})

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t = time.time()
        try:
            yield
        finally:
            self.excluded += time.time() - t

    def read(self) -> dict[str, float]:
        sums: dict[str, float] = {}
        for m in jax.device_get(self.pending):
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        dt = max(time.time() - self.t0 - self.excluded, 1e-9)
        inputs = sums.get("label_sequences", 0.0) or sums.get("rationale_sequences", 0.0)
        out = {
            "steps_per_sec": len(self.pending) / dt,
            "examples_per_sec": inputs / dt,
            "real_tokens_per_sec": (sums.get("target_tokens", 0.0) + sums.get("nonpad_input_tokens", 0.0)) / dt,
        }
        self.pending, self.t0, self.excluded = [], time.time(), 0.0
        return out


def strict_json_row(row: dict[str, Any]) -> str:
    """One strict JSON line: non-finite numbers (which json.dumps would write as the non-JSON tokens NaN and
    Infinity) become null, and the row's ``nonfinite`` lists their keys."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        row = {**{k: (None if k in bad else v) for k, v in row.items()}, "nonfinite": bad}
    return json.dumps(row, allow_nan=False)


def truncate_metrics(path: Path, resumed_step: int) -> None:
    """Keeps the rows of steps up to ``resumed_step``: the steps after it are redone by the resumed run, which
    would otherwise log them twice (a torn last line from a kill goes too)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= resumed_step:
            keep.append(line + "\n")
    atomic_write(path, "".join(keep))


def summary_writer_class() -> type:
    """tensorboardX's SummaryWriter. Its module imports torch where torch is installed (seconds per process), only
    to accept torch tensors; dss_jax writes floats, so torch is kept out while it loads unless something imported it.
    Every TensorBoard writer of dss_jax comes from here."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError, which it catches
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """metrics.jsonl (strict JSON, each step once) and TensorBoard, from process 0 only."""

    def __init__(self, model_dir: Path, resumed_step: int = 0):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        SummaryWriter = summary_writer_class()
        truncate_metrics(model_dir / "metrics.jsonl", resumed_step)
        self.jsonl = open(model_dir / "metrics.jsonl", "a", encoding="utf-8")
        # purge_step: TensorBoard drops the events the earlier run wrote after the resumed step
        self.tb = SummaryWriter(str(model_dir / "tb"), purge_step=resumed_step + 1 if resumed_step else None)

    def write(self, step: int, kind: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(strict_json_row({"step": step, "kind": kind, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(f"{kind}/{k}", v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
