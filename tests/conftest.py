"""Shared test setup: 8 simulated CPU devices (set before jax is imported), toy data, CLI helpers and a toy student
trained once per test session (tiny model configs: tests/factories.py)."""

import dataclasses
import functools
import os

# Tests check what the programs compute, not how fast: LLVM's optimization level 0 cuts XLA:CPU compile time ~45%
# (the suite compiles thousands of small programs once each) and changes no HLO pass and no float semantics (no
# fast math either way); bitwise tests compare runs under the same flags. Benchmarks and users keep the default.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from pathlib import Path

import jax  # noqa: F401  (reads its settings now: the compilation cache below is for CLI subprocesses only)
import pytest

# One persistent XLA compilation cache for the CLIs the tests run (dss-train, dss-eval, ... inherit os.environ):
# the tiny configs compile the same train, eval and decode steps dozens of times over, and a cached compile is a
# file read. Every compile is stored, however short: a toy dss-train run compiles a dozen programs under 0.5 s
# that every other run would compile again (warm, 16.7 s with only those of 0.5 s or more stored, 15.1 s with all).
# Not in this process, whose thousands of one-off compiles would cost more to store than they save. JAX keys each
# entry on the HLO, the devices and its version; delete the folder to reclaim the space.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/dss_jax/xla_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("DSS_DATA_DIR") or REPO.parent / "shared" / "data" / "dss")  # as the Makefile sets it
DURATIONS = Path(__file__).with_name("durations.json")  # seconds per test file, from a whole run (--store-durations)


def pytest_addoption(parser):
    parser.addoption(
        "--store-durations", action="store_true", help=f"write each test file's seconds (all phases, all workers) to {DURATIONS}"
    )


def pytest_collection_modifyitems(config, items):
    """Longest test files first, by DURATIONS (files it does not list first of all: they may be long). With
    ``--dist loadfile --no-loadscope-reorder`` the workers take whole files in this order, so the last files to
    start are short ones and the workers end together. Tests keep their order within a file."""
    import json
    import math

    seconds = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    items.sort(key=lambda item: -seconds.get(item.nodeid.split("::")[0], math.inf))


_file_seconds: dict[str, float] = {}  # --store-durations: filled from the reports the controller receives


def pytest_runtest_logreport(report):
    f = report.nodeid.split("::")[0]
    _file_seconds[f] = _file_seconds.get(f, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption("--store-durations") and "PYTEST_XDIST_WORKER" not in os.environ:
        import json

        DURATIONS.write_text(json.dumps({f: round(t, 1) for f, t in sorted(_file_seconds.items())}, indent=0) + "\n")


def hf_t5(gated: bool, enc_layers: int = 2, dec_layers: int = 2, vocab: int = 100, seed: int = 0):
    """A small random Hugging Face T5 (v1.1-style untied head when gated, v1.0-style tied otherwise)."""
    import torch
    from factories import hf_t5_config
    from transformers import T5ForConditionalGeneration

    cfg = hf_t5_config(gated, vocab_size=vocab, num_layers=enc_layers, num_decoder_layers=dec_layers)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(cfg).eval()
    if gated:  # an untied head with its own values, as in real v1.1 checkpoints
        model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab, 32))
    return model


def write_data_subset(dest: Path, benchmark: str, lines: int) -> Path:
    """A data dir in the released layout holding the first ``lines`` gold lines of each of ``benchmark``'s splits
    with their teacher completions (``lines`` at most the benchmark's teacher batch size): a run on it trains,
    evaluates and decodes whole splits in seconds. Returns ``dest``."""
    import json

    src, out = SHARED_DATA / benchmark, dest / benchmark
    (out / "llm").mkdir(parents=True, exist_ok=True)
    for gold in src.glob(f"{benchmark}_*.json"):
        (out / gold.name).write_text("".join(gold.read_text().splitlines(keepends=True)[:lines]))
    for batch in src.glob("llm/*_CoT_0.json"):
        (out / "llm" / batch.name).write_text(json.dumps(json.loads(batch.read_text())[:lines]))
    return dest


@pytest.fixture
def hf_dir_factory(tmp_path):
    """Writes a small HF model directory the way transformers does and returns (path, model)."""

    def make(gated: bool, **kw):
        model = hf_t5(gated, **kw)
        path = tmp_path / ("hf_gated" if gated else "hf_relu")
        model.save_pretrained(path, safe_serialization=True)
        return path, model

    return make


WORDS = "apple banana cherry grape lemon mango olive peach pear plum".split()


def write_toy_jsonl(path: Path, n: int = 200, seed: int = 0) -> Path:
    """A learnable toy task in the user format: the label is the input's first word; the rationale says so."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
            row = {
                "input": " ".join(words),
                "label": words[0],
                "rationale": f"the first word is {words[0]}",
                "llm_label": words[0],
            }
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def toy_jsonl(tmp_path_factory):
    return write_toy_jsonl(tmp_path_factory.mktemp("toy") / "toy_train.jsonl")


@functools.cache
def launcher(name: str):
    """``launch/<name>.py`` as a module, loaded once (launch/ holds scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def xla_env(devices: int) -> dict:
    """The environment for a CLI subprocess with ``devices`` simulated CPU devices (the tests' other XLA flags kept,
    as ``launch/local.py`` keeps them for each process)."""
    return {**os.environ, "XLA_FLAGS": launcher("local").xla_flags(os.environ.get("XLA_FLAGS", ""), devices)}


TOY_GIN = str(REPO / "tests" / "gin" / "tiny_user.gin")
# dss-train flags for runs of the package's gin files (2 + 2 layers) whose checks do not span layers: every run
# traces and compiles its model, so one layer per stack costs less (tiny_user.gin has one already)
ONE_LAYER_PER_STACK = ("--gin.model.T5Config.num_encoder_layers=1", "--gin.model.T5Config.num_decoder_layers=1")


def train_cmd(model_dir, toy, *extra: str) -> list[str]:
    """``dss-train`` on the toy JSONL task with the tests' tiny gin config, plus extra flags."""
    import sys

    return [
        sys.executable,
        "-m",
        "dss_jax.train",
        f"--gin_file={TOY_GIN}",
        f"--model_dir={model_dir}",
        f"--gin.USER_TRAIN='{toy}'",
        *extra,
    ]


def foreign_log_lines(text: str) -> list[str]:
    """The lines of ``text`` that TensorFlow, absl or XLA printed themselves (C++ log prefixes such as
    ``W0000 00:00:...``, absl records, TensorFlow source paths, TFDS's preparation banner): a CLI shows none."""
    import re

    pattern = re.compile(r"^[IWEF]\d{4} |tensorflow/|cache_dataset_ops|absl|xla/|^WARNING:|cuInit|Downloading and preparing")
    return [line for line in text.splitlines() if pattern.search(line)]


# The toy student that dss-serve, dss-teacher, dss-eval and dss-infer tests use: 60 steps on 1 device learn the
# toy task well enough that predictions are graded (some right, some wrong). dss-train's output is kept so tests can
# check what a user's shell would show (TF_CPP_MIN_LOG_LEVEL unset).
TOY_STUDENT_FLAGS = (
    "--gin.TRAIN_STEPS=60",
    "--gin.train.train.eval_every=60",
    "--gin.train.train.checkpoint_every=60",
    "--gin.train.train.log_every=20",
    "--gin.optim.learning_rate_schedule.base_learning_rate=3e-3",
    "--gin.train.train.report_train_examples=32",  # the end-of-run table's train row: a subset (no test reads it)
)


@dataclasses.dataclass(frozen=True)
class TrainedStudent:
    model_dir: Path  # shared by every test worker: read it, or copy it (the toy_student fixture) before writing
    output: str  # dss-train's stdout + stderr


def _shared_tmp(tmp_path_factory) -> Path:
    """A folder that every pytest-xdist worker of this run shares (each worker's basetemp is a child of it) and no
    other run sees; without xdist, this run's basetemp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _code_key(*extra: str) -> str:
    """A digest of the package's code and gin files, the tests' gin and ``extra``: a result cached under it is never
    one of other code."""
    import hashlib

    h = hashlib.sha256("\0".join(extra).encode())
    for root in (REPO / "dss_jax", REPO / "tests" / "gin"):
        for f in sorted(root.rglob("*")):
            if f.suffix in (".py", ".gin", ".json", ".txt") and f.is_file():
                h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def toy_student_run(tmp_path_factory) -> TrainedStudent:
    """Trains the toy student once per test session, whatever the number of xdist workers: the first worker to ask
    trains under an exclusive file lock, the others wait on the lock and reuse its result."""
    import fcntl
    import inspect
    import shutil
    import subprocess
    import sys

    key = _code_key(*TOY_STUDENT_FLAGS, inspect.getsource(write_toy_jsonl))
    root = _shared_tmp(tmp_path_factory) / f"toy_student-{key}"
    with open(f"{root}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when this worker dies
        done = root / "output.txt"
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)  # what a worker that died mid-run left
            root.mkdir(parents=True)
            toy = write_toy_jsonl(root / "toy_train.jsonl")
            cmd = [sys.executable, "-m", "dss_jax.train", f"--gin_file={TOY_GIN}", f"--model_dir={root / 'student'}"]
            cmd += [f"--gin.USER_TRAIN='{toy}'", *TOY_STUDENT_FLAGS]
            env = {k: v for k, v in xla_env(1).items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as in a user's shell
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, r.stderr[-3000:]
            (root / "output.tmp").write_text(r.stdout + r.stderr)
            os.replace(root / "output.tmp", done)  # last: its presence means the run is whole
    return TrainedStudent(root / "student", done.read_text())


@pytest.fixture(scope="module")
def toy_student(toy_student_run, tmp_path_factory) -> Path:
    """This test module's own copy of the trained toy student's model dir (tests may write into it, e.g. dss-eval)."""
    import shutil

    d = tmp_path_factory.mktemp("toy_student") / "student"
    shutil.copytree(toy_student_run.model_dir, d)
    return d
