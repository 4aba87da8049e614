"""The TensorFlow-free boundary: the model, trainer, decoding, partitioning, checkpoints, conversion and inference
import without TensorFlow or seqio (the GPU machine has neither; the data layer alone needs them); torch stays out of
the binaries (tensorboardX would import it)."""

import importlib.util
import re
import subprocess
import sys

import pytest
from conftest import REPO

CORE = ("model", "attention", "trainer", "decoding", "partitioning", "checkpoints", "convert", "infer", "batching", "evaluators")


def test_core_modules_import_without_tensorflow_or_seqio():
    code = (
        "import sys\n"
        + "".join(f"import dss_jax.{m}\n" for m in CORE)
        + "bad = sorted(m for m in ('tensorflow', 'seqio', 'tensorflow_datasets') if m in sys.modules)\n"
        + "print(','.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "", f"the core imported {r.stdout.strip()}"


def test_tensorboard_writers_leave_torch_unimported(tmp_path):
    """tensorboardX imports torch where it is installed (seconds per process): every TensorBoard writer of dss_jax
    comes from ``metrics_log.summary_writer_class``, which keeps torch out."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed: nothing to keep out")
    direct = [
        p.name for p in (REPO / "dss_jax").rglob("*.py") if re.search(r"^\s*(from|import) tensorboardX", p.read_text(), re.M)
    ]
    assert direct == ["metrics_log.py"], direct
    code = (
        "import sys\n"
        "from dss_jax import metrics_log\n"
        f"with metrics_log.summary_writer_class()({str(tmp_path)!r}) as w:\n"
        "    w.add_scalar('x', 1.0, 1)\n"
        "print('torch' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False" and list(tmp_path.iterdir())
