"""The TensorFlow-free boundary: the model, trainer, decoding, partitioning, checkpoints, conversion and inference
import without TensorFlow or seqio (the GPU machine has neither; the data layer alone needs them)."""

import subprocess
import sys

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
