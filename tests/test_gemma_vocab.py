"""Gemma's special ids through the vocabulary path, and the decoder start token in the trainer's forward."""

from __future__ import annotations

import numpy as np

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "So the answer is 4", "predict:", "explain:"] * 20


def test_trained_vocabulary_with_gemma_ids(tmp_path):
    from dss_jax.tasks import vocab

    path = vocab.train_sentencepiece(TEXTS, 60, tmp_path / "gemma.model", special_ids="gemma")
    v = vocab.load_vocabulary(path)
    sp = v.tokenizer
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert v.eos_id == 1 and v.pad_id == 0
    ids = v.encode("the cat sat")
    assert ids and 2 not in ids and 0 not in ids  # bos (the decoder start) never comes from the text
    assert v.decode(ids) == "the cat sat"


def test_trained_vocabulary_keeps_t5_ids_by_default(tmp_path):
    from dss_jax.tasks import vocab

    sp = vocab.load_vocabulary(vocab.train_sentencepiece(TEXTS, 60, tmp_path / "t5.model")).tokenizer
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)


def test_forward_starts_each_decoder_segment_with_the_start_token():
    from dss_jax.trainer import with_start_tokens

    tokens = np.array([[0, 5, 6, 0, 7, 0, 0], [0, 8, 9, 4, 0, 0, 0]], np.int32)
    seg = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 0, 0, 0]], np.int32)
    got = np.asarray(with_start_tokens(tokens, seg, 2))
    np.testing.assert_array_equal(got, [[2, 5, 6, 2, 7, 0, 0], [2, 8, 9, 4, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(with_start_tokens(tokens, None, 2))[:, 0], [2, 2])
    assert with_start_tokens(tokens, seg, 0) is tokens  # T5: untouched
