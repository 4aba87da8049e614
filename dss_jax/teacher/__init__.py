"""``dss-teacher``: rationales for any task from an OpenAI-compatible endpoint (``python -m dss_jax.teacher``).

Modules by job: ``cli`` (flags, the run, the summary), ``client`` (store keys, requests with retries and budgets),
``retry`` (backoff, the circuit breaker), ``store`` (the completion store and the output files), ``inputs`` (what
is asked about), ``vote`` (self-consistency and the output rows), ``prompts`` (few-shot prompt files).

The names below load their module on first use, so importing the package imports none of them: that keeps
``python -m dss_jax.teacher.prompts`` (the shipped prompts' rebuild tool) from running a module already imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dss_jax.teacher.cli import build_parser, main
    from dss_jax.teacher.client import KEY_HEADER
    from dss_jax.teacher.inputs import TeacherInput
    from dss_jax.teacher.retry import Breaker
    from dss_jax.teacher.store import Sample, TeacherError, side_paths
    from dss_jax.teacher.vote import Vote, aggregate, majority

_HOME = {
    "build_parser": "cli",
    "main": "cli",
    "KEY_HEADER": "client",
    "TeacherInput": "inputs",
    "Breaker": "retry",
    "Sample": "store",
    "TeacherError": "store",
    "side_paths": "store",
    "Vote": "vote",
    "aggregate": "vote",
    "majority": "vote",
}
__all__ = [
    "KEY_HEADER",
    "Breaker",
    "Sample",
    "TeacherError",
    "TeacherInput",
    "Vote",
    "aggregate",
    "build_parser",
    "main",
    "majority",
    "side_paths",
]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
