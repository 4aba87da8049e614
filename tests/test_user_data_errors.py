"""Users' JSONL that is broken in the ways real files are: every case names the file and the real line."""

import pytest

from dss_jax.tasks import readers


def _write(tmp_path, data: bytes):
    f = tmp_path / "train.jsonl"
    f.write_bytes(data)
    return f


def test_empty_file_is_named(tmp_path):
    f = _write(tmp_path, b"")
    with pytest.raises(readers.DataFormatError, match=r"train.jsonl: no examples"):
        readers.read_user_jsonl(f)
    f = _write(tmp_path, b"\n \n\n")
    with pytest.raises(readers.DataFormatError, match=r"train.jsonl: no examples"):
        readers.read_user_jsonl(f)


def test_non_utf8_names_file_line_and_byte(tmp_path):
    f = _write(tmp_path, b'{"input": "a", "label": "b"}\n{"input": "caf\xe9", "label": "b"}\n')
    with pytest.raises(readers.DataFormatError, match=r"train.jsonl:2: not UTF-8 \(byte 0xe9"):
        readers.read_user_jsonl(f)


def test_utf8_bom_is_accepted(tmp_path):
    f = _write(tmp_path, b'\xef\xbb\xbf{"input": "a", "label": "b"}\n')
    ex = readers.read_user_jsonl(f)
    assert [(e.input, e.label) for e in ex] == [("a", "b")]


def test_line_numbers_count_blank_lines(tmp_path):
    good = b'{"input": "a", "label": "b"}\n'
    f = _write(tmp_path, good + b"\n\n" + good + b'{"input": "a", "label": 3}\n')
    with pytest.raises(readers.DataFormatError, match=r"train.jsonl:5: field 'label' must be a string"):
        readers.read_user_jsonl(f)
    f = _write(tmp_path, good + b"\n" + b"{oops\n")
    with pytest.raises(readers.DataFormatError, match=r"train.jsonl:3: malformed JSON"):
        readers.read_user_jsonl(f)


@pytest.mark.parametrize("field", ["input", "label"])
def test_empty_strings_are_named(tmp_path, field):
    row = {"input": "a", "label": "b", field: "  "}
    import json

    f = _write(tmp_path, b'{"input": "x", "label": "y"}\n' + json.dumps(row).encode() + b"\n")
    with pytest.raises(readers.DataFormatError, match=rf"train.jsonl:2: field '{field}' is empty"):
        readers.read_user_jsonl(f)


def test_second_segment_input_b_is_read(tmp_path):
    """dss-teacher writes the NLI hypothesis as ``input_b``; training on its output must keep it."""
    f = _write(tmp_path, b'{"input": "A man sleeps.", "input_b": "A person rests.", "label": "entailment"}\n')
    assert [(e.input, e.input_b) for e in readers.read_user_jsonl(f)] == [("A man sleeps.", "A person rests.")]
    f = _write(tmp_path, b'{"input": "a", "input_b": 7, "label": "b"}\n')
    with pytest.raises(readers.DataFormatError, match=r"train.jsonl:1: field 'input_b' must be a string"):
        readers.read_user_jsonl(f)


def test_dss_on_rows_without_rationales_says_what_to_do(tmp_path):
    """The README allows rows without rationales; DSS needs them: one error naming the file and the way out."""
    from dss_jax.tasks import pipeline, vocab

    f = _write(tmp_path, b"".join(b'{"input": "w%d x", "label": "w%d"}\n' % (i, i) for i in range(40)))
    v = vocab.get_vocabulary(train_on=str(f), vocab_size=60)
    with pytest.raises(ValueError, match=r"train.jsonl: none of its 40 rows has a 'rationale'.*dss-teacher.*finetune"):
        pipeline.SeqioData(benchmark="norat", method="dss", vocabulary=v, user_train_file=str(f), pack=False)
    with pytest.raises(ValueError, match=r"has a 'llm_label'"):
        pipeline.SeqioData(benchmark="norat2", method="distill", vocabulary=v, user_train_file=str(f), pack=False)
    data = pipeline.SeqioData(benchmark="norat3", method="finetune", vocabulary=v, user_train_file=str(f), pack=False)
    assert data.task


def test_labels_with_inner_whitespace_train_and_score_as_normalised_text(tmp_path):
    """A label holding a newline, a tab or a double space is normalised once at load (whitespace runs -> one space,
    ends stripped): the training target and the gold the scorer compares with are that text, and a prediction of
    it (as SentencePiece decodes it) scores correct. Before, the raw gold could never be matched."""
    import json

    from dss_jax import decoding
    from dss_jax.tasks import pipeline, vocab

    raw = ["new\nyork", "left\tbank", "two  words", " olive \n grove\t"]
    want = ["new york", "left bank", "two words", "olive grove"]
    rows = [
        {"input": f"row {i} {w}", "label": raw[i % 4], "rationale": "r", "llm_label": raw[i % 4]}
        for i, w in enumerate("abcdefghijklmnopqrst")
    ]
    f = _write(tmp_path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    v = vocab.get_vocabulary(train_on=str(f), vocab_size=60)
    data = pipeline.SeqioData(benchmark="ws_labels", method="dss", vocabulary=v, user_train_file=str(f), pack=False)
    for split in ("train", "validation"):
        examples = data.selection_examples(split)
        gold = [e["targets_pretokenized"].decode() for e in examples]
        assert gold and set(gold) <= set(want), gold
        assert data.score(split, gold)["accuracy"] == 100.0
        decoded = data.detokenize([decoding.cut_at_eos(t, v.eos_id)[0] for t in data.tokenize(gold)])
        assert data.score(split, decoded)["accuracy"] == 100.0  # what the model can emit is what is scored
    train = readers.read_user_jsonl(f)
    assert [e.label for e in train[:4]] == want and [e.llm_label for e in train[:4]] == want


def test_training_data_and_dss_infer_read_jsonl_through_one_reader_with_one_error(tmp_path):
    """dss-infer's inputs and the training data fail alike: a DataFormatError naming the file and line (or the
    missing file), from the data layer's one JSONL reader."""
    from pathlib import Path

    from dss_jax import infer

    def infer_read(path):
        return list(infer.read_inputs(Path(path), infer.InferStats()))

    bad = tmp_path / "x.jsonl"
    bad.write_text('{"input": "a", "label": "b"}\n{"input": 3, "label": "b"}\n')
    for read in (readers.read_user_jsonl, infer_read):
        with pytest.raises(readers.DataFormatError, match=r"x.jsonl:2: field 'input' must be a string, got int"):
            read(bad)
        with pytest.raises(readers.DataFormatError, match=r"nowhere.jsonl: no such file"):
            read(tmp_path / "nowhere.jsonl")
