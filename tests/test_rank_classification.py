"""Rank classification: each listed candidate scored by the label task's likelihood, the most likely picked."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ONE_LAYER_PER_STACK, SHARED_DATA, foreign_log_lines, write_data_subset, xla_env
from factories import tiny_t5

from dss_jax import decoding, evaluators
from dss_jax.model import init_params
from dss_jax.tasks import baselines

CFG = tiny_t5(vocab_size=50, d_kv=8, num_decoder_layers=2, relative_attention_num_buckets=8)


def _brute_force(params, inputs, choices):
    """One choice at a time through the plain teacher-forced model: the obviously-correct twin."""
    picks, scores = [], []
    for row, cands in zip(inputs, choices, strict=True):
        s = []
        for toks in cands:
            padded = np.zeros((1, 8), np.int32)  # one shape, one compile; the reference stops at EOS
            padded[0, : len(toks)] = toks
            s.append(float(decoding.sequence_log_prob(params, np.asarray(row)[None], padded, CFG)[0]))
        scores.append(s)
        picks.append(int(np.argmax(s)))
    return picks, scores


def test_rank_classification_equals_brute_force_scoring():
    params = init_params(CFG, jax.random.PRNGKey(3))
    rng = np.random.default_rng(0)
    n = 11  # not a multiple of the batch: the last batch is padded
    inputs = np.zeros((n, 12), np.int32)
    for i in range(n):
        k = rng.integers(3, 12)
        inputs[i, :k] = rng.integers(2, 50, size=k)
        inputs[i, k - 1] = CFG.eos_token_id
    # candidates of different lengths, and rows with fewer candidates than others (CQA has 5, NLI 3)
    choices = [
        [list(rng.integers(2, 50, size=rng.integers(1, 6))) + [CFG.eos_token_id] for _ in range(rng.integers(2, 6))]
        for _ in range(n)
    ]
    picks = evaluators.rank_classify(params, CFG, inputs, choices, batch_size=4)
    ref_picks, ref_scores = _brute_force(params, inputs, choices)
    assert list(picks) == ref_picks
    assert len(set(ref_picks)) > 1  # not one fixed position winning everywhere

    cand = np.zeros((n, 5, 8), np.int32)
    for i, cs in enumerate(choices):
        for j, t in enumerate(cs):
            cand[i, j, : len(t)] = t
    batched = np.asarray(decoding.choice_log_probs(params, inputs, cand, CFG))
    for i, s in enumerate(ref_scores):
        np.testing.assert_allclose(batched[i, : len(s)], s, rtol=1e-5, atol=1e-5)
        assert np.all(np.isneginf(batched[i, len(s) :]))  # missing candidates never win


def test_candidate_labels_per_benchmark():
    cqa = "predict: Where do you keep milk?\nAnswer Choices:\n(a) fridge\n(b) oven\n(c) shelf\n(d) car\n(e) bed"
    assert baselines.candidate_labels("cqa", cqa) == ["fridge", "oven", "shelf", "car", "bed"]
    assert baselines.candidate_labels("esnli", "any") == ["entailment", "neutral", "contradiction"]
    assert baselines.candidate_labels("svamp", "Tom has 3 apples") is None


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data/dss is not beside the repo")
def test_rank_classification_in_the_loop_and_in_dss_eval_agree(tmp_path):
    """A short CQA run with the in-loop option reports rank accuracy per split; dss-eval's flag reproduces the
    validation number from the same checkpoint, and every ranked prediction is one of the input's choices."""
    data = write_data_subset(tmp_path / "data", "cqa", 48)  # validation (carved from train) and test: 5 and 48
    env = {**xla_env(1), "DSS_DATA_DIR": str(data), "DSS_TFDS_DIR": os.environ.get("DSS_TFDS_DIR", str(tmp_path / "tfds"))}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it: TensorFlow's C++ warnings are not silenced
    model_dir = tmp_path / "cqa"
    train = [
        sys.executable,
        "-m",
        "dss_jax.train",
        "--gin_file=runs/quickstart_cqa.gin",
        f"--model_dir={model_dir}",
        "--gin.TRAIN_STEPS=10",
        *ONE_LAYER_PER_STACK,
        "--gin.optim.learning_rate_schedule.warmup_steps=2",
        "--gin.train.train.eval_every=10",
        "--gin.train.train.log_every=5",
        "--gin.train.train.report_train_examples=16",  # a subset: a partial read of train
        "--gin.pipeline.SeqioData.max_eval_examples=64",
        "--gin.pipeline.SeqioData.rank_classification=True",
        "--gin.pipeline.SeqioData.targets_length=16",  # CQA's labels fit
    ]
    r = subprocess.run(train, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank acc %" in r.stdout
    # subsets of train and validation are scored (partial reads), on TFDS data prepared on first use: no line from
    # TensorFlow, absl or XLA (no cache_dataset_ops warning for a half-read split: TFDS's auto-cache is off)
    assert foreign_log_lines(r.stdout + r.stderr) == []
    summary = json.loads((model_dir / "summary.json").read_text())
    val = summary["splits"]["validation"]
    assert 0.0 <= val["rank_accuracy"] <= 100.0 and "rank_accuracy" in summary["splits"]["test"]
    evals = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines() if '"kind": "eval"' in x]
    assert "cqa_label_gold/rank_accuracy" in evals[-1]

    r = subprocess.run(
        [sys.executable, "-m", "dss_jax.evaluate", f"--model_dir={model_dir}", "--rank_classification"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["examples"] == val["examples"]
    assert result["rank_classification_accuracy"] == pytest.approx(val["rank_accuracy"], abs=1e-6)
    rows = [json.loads(x) for x in open(model_dir / "eval" / f"validation_{result['step']}_predictions.jsonl")]
    assert all(row["rank_prediction"] in baselines.candidate_labels("cqa", row["input"]) for row in rows)
