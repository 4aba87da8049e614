"""``dss-teacher``: rationales for any task from an OpenAI-compatible endpoint (``python -m dss_jax.teacher``).

Modules by job: ``cli`` (flags, the run, the summary), ``client`` (store keys, requests with retries and budgets),
``retry`` (backoff, the circuit breaker), ``store`` (the completion store and the output files), ``inputs`` (what
is asked about), ``vote`` (self-consistency and the output rows), ``prompts`` (few-shot prompt files).
"""

from dss_jax.teacher.cli import build_parser, main
from dss_jax.teacher.client import KEY_HEADER
from dss_jax.teacher.inputs import TeacherInput
from dss_jax.teacher.retry import Breaker
from dss_jax.teacher.store import Sample, TeacherError, side_paths
from dss_jax.teacher.vote import Vote, aggregate, majority

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
