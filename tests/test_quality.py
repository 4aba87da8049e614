"""The rationale-quality rules (tasks/quality.py) on hand-made rows: what each keeps and counts."""

from __future__ import annotations

import pytest
from factories import tiny_t5

from dss_jax.tasks import quality
from dss_jax.tasks.readers import Example


def _ex(i, inp, label, llm, rationale="because", parse_ok=True):
    return Example(
        idx=i, input=inp, input_b="", label=label, rationale=rationale, llm_label=llm, has_teacher=True, parse_ok=parse_ok
    )


def test_teacher_correct_keeps_rows_whose_teacher_label_is_the_human_one():
    rows = [_ex(0, "a", "yes", "yes"), _ex(1, "b", "yes", "no"), _ex(2, "c", "no", "", parse_ok=False)]
    keep, counts = quality.select_rationales(rows, "teacher_correct", None, None)
    assert keep.tolist() == [True, False, False]
    assert counts == {"with_rationale": 3, "dropped_teacher_wrong": 2, "kept": 1}


def test_majority_vote_keeps_the_most_common_label_among_an_inputs_samples():
    rows = [
        _ex(0, "q1", "3", "3"),
        _ex(1, "q1", "3", "4"),
        _ex(2, "q1", "3", "4"),  # the teacher's majority is wrong here: still the majority
        _ex(3, "q2", "5", "6"),  # one sample: nothing to vote on, kept
        _ex(4, "q3", "1", "1"),
        _ex(5, "q3", "1", "", parse_ok=False),  # an unparsed sample does not vote and is not the winner
    ]
    keep, counts = quality.select_rationales(rows, "majority_vote", None, None)
    assert keep.tolist() == [False, True, True, True, True, False]
    assert counts["dropped_minority_vote"] == 2 and counts["kept"] == 4


def test_majority_vote_counts_equivalent_svamp_equations_as_one_answer():
    """The vote compares answers as the benchmark does (``answers.answer_key``): "(8 + 2)" and "(2 + 8)" are one
    answer (10) and outvote "(8 - 2)", as they do in dss-teacher's vote."""
    rows = [
        _ex(0, "q", "( 8.0 + 2.0 )", "(8 - 2)"),
        _ex(1, "q", "( 8.0 + 2.0 )", "(8 + 2)"),
        _ex(2, "q", "( 8.0 + 2.0 )", "(2 + 8)"),
    ]
    keep, counts = quality.select_rationales(rows, "majority_vote", None, "svamp")
    assert keep.tolist() == [False, True, True]
    assert counts["dropped_minority_vote"] == 1


def test_length_cap_counts_tokens_and_needs_a_tokenizer():
    rows = [_ex(0, "a", "x", "x", "one two"), _ex(1, "b", "x", "x", "one two three four"), _ex(2, "c", "x", "x", "")]
    words = lambda texts: [len(t.split()) + 1 for t in texts]  # noqa: E731  (+1: EOS)
    keep, counts = quality.select_rationales(rows, "all", 3, None, words)
    assert keep.tolist() == [True, False, False]  # no rationale: neither kept nor counted as dropped
    assert counts == {"with_rationale": 2, "dropped_too_long": 1, "kept": 1}
    with pytest.raises(ValueError, match="vocabulary"):
        quality.select_rationales(rows, "all", 3, None)


def test_the_rationale_options_are_checked_where_they_are_built():
    with pytest.raises(ValueError, match="rationale_filter='best'"):
        quality.check_options("best", None, 1)
    with pytest.raises(ValueError, match=r"rationales_per_input must be in \[1, 8\], got 9"):
        quality.check_options("all", None, 9)
    with pytest.raises(ValueError, match="max_rationale_tokens must be at least 2"):
        quality.check_options("all", 1, 1)


def _write(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.slow
def test_several_rationales_per_input_are_weighted_so_each_input_counts_once(tmp_path):
    """With ``rationales_per_input=2`` an input with two rationales yields two rationale examples, each weighted
    1/2: when its second rationale tokenizes like the first, every loss equals the one-rationale data's, although
    the inputs with two rationales now appear twice. Without the weights they would count double."""
    import functools

    import jax
    import numpy as np

    from dss_jax import trainer
    from dss_jax.model import init_params
    from dss_jax.tasks import pipeline, registry, vocab

    words = ["red", "blue", "green", "small", "large", "round", "square", "soft"]
    base = [
        {"input": f"is the {w} thing {v}", "label": "yes" if i % 2 else "no", "llm_label": "yes" if i % 2 else "no",
         "rationale": f"the {w} thing is {v} because it is {words[(i + 3) % 8]}"}
        for i, (w, v) in enumerate(zip(words, reversed(words), strict=True))
    ]  # fmt: skip
    one = _write(tmp_path / "one.jsonl", base)
    # inputs 0, 2, 4, 6: a second rationale that differs only by a trailing space (the same tokens)
    two = _write(
        tmp_path / "two.jsonl", [{**r, "rationales": [r["rationale"] + " "]} if i % 2 == 0 else r for i, r in enumerate(base)]
    )
    v = vocab.get_vocabulary(train_on=one, vocab_size=60)
    cfg = tiny_t5()
    params = init_params(cfg, jax.random.PRNGKey(0))
    eval_step = jax.jit(functools.partial(trainer.eval_step, cfg=cfg))  # eager flax would run op by op

    def measure(path, k):
        registry.register_user_data("kq", v, path, path, options=registry.DataOptions(rationales_per_input=k))
        out = {}
        for task in ("kq_rationale", "kq_dss_gold"):
            ds = pipeline.get_dataset(
                task, "train", 32, 32, 64, pack=False, shuffle=False, seed=0, num_epochs=1, drop_remainder=False
            )
            batch = {name: x.numpy() for name, x in next(iter(ds)).items()}
            sums = jax.device_get(eval_step(params, batch))
            flat = {**batch, "decoder_loss_weights": (batch["decoder_loss_weights"] > 0).astype(np.int32)}
            unweighted = jax.device_get(eval_step(params, flat))
            out[task] = {
                "unweighted_rationale_loss": float(unweighted["rationale_loss_sum"] / unweighted["rationale_tokens"]),
                "rows": int((batch["decoder_loss_weights"].sum(1) > 0).sum()),
                "weights": sorted(set(batch["decoder_loss_weights"][batch["decoder_loss_weights"] > 0].tolist())),
                "rationale_loss": float(sums["rationale_loss_sum"] / sums["rationale_tokens"]),
                "label_loss": float(sums["label_loss_sum"] / max(sums["label_tokens"], 1)),
            }
        return out

    a, b = measure(one, 1), measure(two, 2)
    assert a["kq_rationale"]["rows"] == 8 and b["kq_rationale"]["rows"] == 12  # 4 inputs with two rationales
    assert a["kq_dss_gold"]["rows"] == 16 and b["kq_dss_gold"]["rows"] == 20  # each input's label once
    assert a["kq_dss_gold"]["weights"] == [1] and b["kq_dss_gold"]["weights"] == [1, 2]  # lcm(1, 2) = 2: 2 and 2/2
    for task in a:
        np.testing.assert_allclose(b[task]["rationale_loss"], a[task]["rationale_loss"], rtol=1e-6)
        np.testing.assert_allclose(b[task]["label_loss"], a[task]["label_loss"], rtol=1e-6)
    # and the weights are what makes it so: the same rows, all weighted alike, give another mean
    assert abs(b["kq_rationale"]["unweighted_rationale_loss"] - a["kq_rationale"]["rationale_loss"]) > 1e-4
