"""Shared test setup: 8 simulated CPU devices (set before jax is imported) and small T5 factories."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from pathlib import Path

import jax  # noqa: F401  (reads its settings now: the compilation cache below is for CLI subprocesses only)
import pytest

# One persistent XLA compilation cache for the CLIs the tests run (dss-train, dss-eval, ... inherit os.environ):
# the tiny configs compile the same train, eval and decode steps dozens of times over, and a cached compile is a
# file read (a toy dss-train run: 49 s cold, 28 s warm). Only compiles of 0.5 s or more are stored, and not in this
# process, whose thousands of small compiles would cost more to store than they save. JAX keys each entry on the
# HLO, the devices and its version; delete the folder to reclaim the space.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/dss_jax/xla_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("DSS_DATA_DIR") or REPO.parent / "shared" / "data" / "dss")  # as the Makefile sets it


def hf_t5(gated: bool, enc_layers: int = 2, dec_layers: int = 2, vocab: int = 100, seed: int = 0):
    """A small random Hugging Face T5 (v1.1-style untied head when gated, v1.0-style tied otherwise)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=vocab,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=enc_layers,
        num_decoder_layers=dec_layers,
        num_heads=4,
        feed_forward_proj="gated-gelu" if gated else "relu",
        tie_word_embeddings=not gated,
        dropout_rate=0.0,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(cfg).eval()
    if gated:  # an untied head with its own values, as in real v1.1 checkpoints
        model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab, 32))
    return model


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


def xla_env(devices: int) -> dict:
    """The environment for a CLI subprocess with ``devices`` simulated CPU devices."""
    import os

    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


TOY_GIN = str(REPO / "tests" / "gin" / "tiny_user.gin")


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
