"""Logging for the binaries: dss_jax at INFO on stderr, third-party loggers and TensorFlow's start-up lines quiet."""

from __future__ import annotations

import importlib
import logging
import os


def quiet_data_layer_imports() -> None:
    """Imports TensorFlow and friends with fd 2 closed: their C++ start-up lines (CUDA probes on a CPU machine,
    absl's pre-init warning) bypass Python logging and TF_CPP_MIN_LOG_LEVEL. Errors still raise."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        for name in ("tensorflow", "tensorflow_text", "tensorflow_datasets", "seqio"):
            try:
                importlib.import_module(name)
            except ImportError:
                pass  # the data layer's own import reports it where it is needed
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")  # the input pipeline runs on the host; accelerators are JAX's
    except ImportError:
        pass
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def setup_logging() -> None:
    """INFO from dss_jax to stderr (absl may already own the root logger); quieter third-party loggers."""
    lg = logging.getLogger("dss_jax")
    if not lg.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        lg.addHandler(handler)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    for noisy in ("absl", "orbax", "jax._src", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
