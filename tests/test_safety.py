"""Nothing silent, nothing executed: gin bindings that a job never reads are errors naming them and where they were
written; a model dir from elsewhere is read as data (its config.gin never runs); users' data without rationales
for DSS stops with one line saying what to do."""

import json
import random
import shutil
import subprocess
import sys

import gin
import pytest
from conftest import REPO, TOY_GIN, train_cmd, write_toy_jsonl, xla_env

from dss_jax import gin_utils


def _error_lines(stderr: str, prog: str) -> list[str]:
    """The lines starting ``PROG: error``; the last one ends stderr (no traceback or gin context after it)."""
    lines = [line for line in stderr.splitlines() if line.startswith(f"{prog}: error")]
    assert lines and stderr.rstrip().splitlines()[-1] == lines[-1], stderr[-2000:]
    return lines


# --- gin bindings that nothing reads ---------------------------------------------------------------------------


def test_unread_bindings_are_named_with_where_they_were_written(tmp_path):
    """Operative-config check, in-process and without TensorFlow: only what a call actually used counts as read."""
    from dss_jax import losses, optim, partitioning

    user = tmp_path / "mine.gin"
    user.write_text(
        "include 'models/t5_1_1_tiny.gin'\n"  # the package's own file: shared defaults, not reported
        "from __gin__ import dynamic_registration\n"
        "from dss_jax import losses\n"
        "from dss_jax import optim\n"
        "from dss_jax import partitioning\n"
        "STEPS = 7\n"
        "STEPZ = 3\n"
        "partitioning.MeshConfig.fsdp = 1\n"
        "partitioning.MeshConfig.data = 2\n"
        "losses.LossConfig.alpha = 0.3\n"
        "optim.make_optimizer.learning_rate = @optim.learning_rate_schedule()\n"
        "optim.learning_rate_schedule.total_steps = %STEPS\n"
    )
    gin.clear_config()
    try:
        gin_utils.parse_gin([str(user)], ["losses.LossConfig.mode = 'token_mean'"], finalize=False)
        partitioning.MeshConfig(data=1)  # the caller passes data: the bound 2 is never used
        unread = gin_utils.unread_bindings()
        assert f"partitioning.MeshConfig.data ({user}:9)" in unread
        assert f"macro STEPZ ({user}:7; did you mean STEPS?)" in unread  # the closest macro a binding references
        assert f"losses.LossConfig.alpha ({user}:10)" in unread
        assert "losses.LossConfig.mode (on the command line: losses.LossConfig.mode = 'token_mean')" in unread
        assert not any("fsdp" in u or "T5Config" in u or "MODEL_CONFIG" in u for u in unread)
        # what the job calls later, and what its bindings reference (the schedule, STEPS), is not reported yet
        later = gin_utils.unread_bindings(pending=["optim.make_optimizer"])
        assert not any(u.startswith(("optim.", "macro STEPS ")) for u in later) and any("optim." in u for u in unread)
        losses.LossConfig()
        with pytest.raises(gin_utils.UnreadBindingError, match=r"^gin bindings that dss-x never reads: .*STEPZ"):
            gin_utils.check_bindings_read("dss-x", pending=["optim.make_optimizer"])
        assert not any("LossConfig" in u for u in gin_utils.unread_bindings())
        optim.learning_rate_schedule()  # reads STEPS
        assert f"macro STEPZ ({user}:7; did you mean STEPS?)" in gin_utils.unread_bindings()
    finally:
        gin.clear_config()


@pytest.mark.slow
def test_unread_bindings_stop_dss_train_before_the_model_dir_is_made(tmp_path):
    """A binding of a configurable the run never calls (register_benchmark: the run reads a user's file) and a
    macro nothing references, in the user's gin file: one line naming both and where they were written."""
    toy = write_toy_jsonl(tmp_path / "toy.jsonl", n=60)
    user = tmp_path / "mine.gin"
    user.write_text(f"include '{TOY_GIN}'\nEPOCHS = 3\n")
    model_dir = tmp_path / "m"
    cmd = train_cmd(model_dir, toy, "--gin.registry.register_benchmark.data_dir='/nowhere'")
    cmd[cmd.index(f"--gin_file={TOY_GIN}")] = f"--gin_file={user}"
    r = subprocess.run(cmd, env=xla_env(1), capture_output=True, text=True, timeout=900)
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = _error_lines(r.stderr, "dss-train")
    assert f"macro EPOCHS ({user}:2)" in line
    assert "registry.register_benchmark.data_dir (on the command line: registry.register_benchmark.data_dir = '/nowhere')" in line
    assert "Traceback" not in r.stderr and not model_dir.exists()


@pytest.mark.slow
def test_an_override_for_a_part_the_run_does_not_use_stops_before_the_first_step(tmp_path):
    """``mixture_rate.a`` sets the rates of the 'rates' mixture; this run mixes by objective, so it would change
    nothing. The mixture is built with the data iterators, so this fails at the second check, before any step."""
    toy = write_toy_jsonl(tmp_path / "toy.jsonl", n=60)
    model_dir = tmp_path / "m"
    r = subprocess.run(
        train_cmd(model_dir, toy, "--gin.registry.mixture_rate.a=0.3"),
        env=xla_env(1),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = _error_lines(r.stderr, "dss-train")
    assert "gin binding that dss-train never reads: registry.mixture_rate.a (on the command line" in line
    assert "Traceback" not in r.stderr
    assert not list((model_dir / "checkpoints").glob("[0-9]*"))  # no step was taken or saved
    metrics = model_dir / "metrics.jsonl"
    assert not (metrics.exists() and metrics.read_text().strip())


def test_gin_values_of_the_wrong_type_are_named_with_where_they_were_written(tmp_path):
    """In-process and without TensorFlow: a value that does not fit its parameter's annotation (a macro followed to
    its value) is one line per binding; every run gin file of the package passes."""
    user = tmp_path / "mine.gin"
    user.write_text(f"include '{TOY_GIN}'\nfrom dss_jax import optim\noptim.learning_rate_schedule.base_learning_rate = 'fast'\n")
    gin.clear_config()
    try:
        with pytest.raises(SystemExit):
            gin_utils.parse_gin([str(user)], ["USER_TRAIN = 'x.jsonl'", "train.train.batch_size = 'x'"], finalize=False)
        wrong = gin_utils.binding_type_errors()
        assert f"optim.learning_rate_schedule.base_learning_rate = 'fast' ({user}:3): expected a number" in wrong
        assert "train.train.batch_size = 'x' (on the command line: train.train.batch_size = 'x'): expected an integer" in wrong
        gin.clear_config()
        with pytest.raises(SystemExit):
            gin_utils.parse_gin([TOY_GIN], ["USER_TRAIN = 'x.jsonl'", "TRAIN_STEPS = 2.5"], finalize=False)
        assert any(
            w.startswith("train.train.num_steps = %TRAIN_STEPS = 2.5 (macro TRAIN_STEPS") for w in gin_utils.binding_type_errors()
        )
        for f in sorted((gin_utils.GIN_DIR / "runs").glob("*.gin")):
            gin.clear_config()
            gin_utils.parse_gin([str(f)], [], finalize=False)
            assert gin_utils.binding_type_errors() == [], f
    finally:
        gin.clear_config()


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gin.train.train.batch_size='x'"], "train.train.batch_size = 'x' (on the command line"),
        (["--gin.optim.learning_rate_schedule.base_learning_rate='fast'"], "base_learning_rate = 'fast'"),
        (["--gin.train.train.batch_size=-4"], "train.train.batch_size=-4: must be 1 or more"),
    ],
)
def test_bad_training_values_are_one_line_before_the_model_dir_is_made(tmp_path, flags, message):
    toy = write_toy_jsonl(tmp_path / "toy.jsonl", n=60)
    model_dir = tmp_path / "m"
    r = subprocess.run(train_cmd(model_dir, toy, *flags), env=xla_env(1), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not model_dir.exists()


@pytest.mark.slow
def test_a_model_dir_that_is_a_file_is_one_line(tmp_path):
    toy = write_toy_jsonl(tmp_path / "toy.jsonl", n=60)
    model_dir = tmp_path / "m"
    model_dir.write_text("not a dir")
    r = subprocess.run(train_cmd(model_dir, toy), env=xla_env(1), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = _error_lines(r.stderr, "dss-train")
    assert f"--model_dir={model_dir} is a file, not a directory" in line and "Traceback" not in r.stderr


# --- model dirs are data -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(toy_student):
    """The session's toy student (this module's copy): its model dir, and the validation accuracy measured in the loop."""
    evals = [json.loads(x) for x in (toy_student / "metrics.jsonl").read_text().splitlines() if '"kind": "eval"' in x]
    return toy_student, evals[-1]["toy_label_gold/accuracy"]


def _hostile_copy(model_dir, tmp_path):
    """The model dir as received from someone else: its config.gin imports os and calls os.system when parsed."""
    hostile = tmp_path / "from_elsewhere"
    shutil.copytree(model_dir, hostile, ignore=shutil.ignore_patterns("eval"))
    marker = tmp_path / "executed"
    with open(hostile / "config.gin", "a") as f:  # as in test_eval_infer, where --trust_config_gin shows it runs
        f.write(f"\nimport os\nos.system.command = 'touch {marker}'\npipeline.SeqioData.max_eval_examples = @os.system()\n")
    return hostile, marker


def _cli(module: str, *args: str):
    return subprocess.run(
        [sys.executable, "-m", module, *args], env=xla_env(1), capture_output=True, text=True, cwd=REPO, timeout=300
    )


@pytest.mark.slow
def test_dss_eval_and_dss_infer_never_execute_a_model_dirs_config_gin(trained, tmp_path):
    model_dir, in_loop = trained
    hostile, marker = _hostile_copy(model_dir, tmp_path)
    r = _cli("dss_jax.evaluate", f"--model_dir={hostile}")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["accuracy"] == pytest.approx(in_loop, abs=1e-6) and result["examples"] > 0
    inputs = tmp_path / "in.txt"
    inputs.write_text("apple pear plum\nlemon olive\n")
    r = _cli("dss_jax.infer", f"--model_dir={hostile}", f"--input={inputs}", "--no_progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stdout.splitlines()) == 2
    assert not marker.exists()


@pytest.mark.slow
def test_dss_eval_on_an_old_model_dir_says_how_to_proceed_and_runs_nothing(trained, tmp_path):
    """A model dir written before the JSON data spec: a clear error, never a silent parse of its config.gin (which
    only --trust_config_gin runs)."""
    hostile, marker = _hostile_copy(trained[0], tmp_path)
    (hostile / "inference.json").unlink()
    r = _cli("dss_jax.evaluate", f"--model_dir={hostile}")
    assert r.returncode == 2
    (line,) = _error_lines(r.stderr, "dss-eval")
    assert "has no data spec" in line and "--trust_config_gin" in line
    assert "Traceback" not in r.stderr and not marker.exists()
    _cli("dss_jax.evaluate", f"--model_dir={hostile}", "--trust_config_gin")
    assert marker.exists()  # the hostile line is real: trusting the config executes it


@pytest.mark.slow
def test_dss_eval_on_a_model_dir_without_its_model_config_names_the_file_and_the_way_back(trained, tmp_path):
    """A copy of a model dir that lost dss_config.json: one line naming it and how to get it back (not a message
    about pretrained checkpoints)."""
    copy = tmp_path / "copy"
    shutil.copytree(trained[0], copy, ignore=shutil.ignore_patterns("eval"))
    (copy / "dss_config.json").unlink()
    r = _cli("dss_jax.evaluate", f"--model_dir={copy}")
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = _error_lines(r.stderr, "dss-eval")
    assert f"{copy / 'dss_config.json'} not found" in line and "dss-convert" not in line and "dss-train" in line
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_dss_eval_on_a_file_or_a_missing_dir_says_which_in_one_line(tmp_path):
    afile = tmp_path / "m.txt"
    afile.write_text("not a model dir")
    for path, what in ((afile, "a file, not a model dir"), (tmp_path / "none", "no such model dir")):
        r = _cli("dss_jax.evaluate", f"--model_dir={path}")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        (line,) = _error_lines(r.stderr, "dss-eval")
        assert f"{path}: {what}" in line, line


@pytest.mark.slow
def test_dss_eval_rejects_overrides_it_never_reads(trained):
    """The model config comes from dss_config.json and the data from the data spec: overriding either through gin
    would change nothing."""
    model_dir, _ = trained
    r = _cli(
        "dss_jax.evaluate",
        f"--model_dir={model_dir}",
        "--gin.model.T5Config.dropout_rate=0.5",
        "--gin.pipeline.SeqioData.method='finetune'",
    )
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = _error_lines(r.stderr, "dss-eval")
    assert "model.T5Config.dropout_rate (on the command line" in line and "pipeline.SeqioData.method (on the command line" in line
    assert not list(model_dir.glob("eval/*_metrics.json"))


@pytest.mark.slow
def test_dss_eval_after_the_training_file_changed_gives_the_same_predictions(tmp_path):
    """dss-eval reads the vocabulary (spiece.model) and the data spec from the model dir: rewriting the training
    JSONL afterwards (other rows, other words: a vocabulary rebuilt from it tokenizes the same text differently)
    changes neither predictions nor metrics: the model is never fed ids from a vocabulary rebuilt from the training
    data named in config.gin."""
    import sentencepiece as spm

    from dss_jax.tasks import vocab

    train = write_toy_jsonl(tmp_path / "train.jsonl", n=200, seed=0)
    val = write_toy_jsonl(tmp_path / "validation.jsonl", n=24, seed=1)
    test = write_toy_jsonl(tmp_path / "test.jsonl", n=24, seed=2)
    model_dir = tmp_path / "m"
    cmd = train_cmd(
        model_dir,
        train,
        "--gin.TRAIN_STEPS=20",
        "--gin.train.train.eval_every=0",  # dss-eval below evaluates it
        "--gin.train.train.checkpoint_every=20",
        "--gin.train.train.log_every=10",
        "--gin.train.train.evaluate_test=False",
        f"--gin.pipeline.SeqioData.user_validation_file='{val}'",
        f"--gin.pipeline.SeqioData.user_test_file='{test}'",
    )
    r = subprocess.run(cmd, env=xla_env(1), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = model_dir / "eval"

    def evaluate() -> tuple[str, dict]:
        shutil.rmtree(out, ignore_errors=True)
        r = _cli("dss_jax.evaluate", f"--model_dir={model_dir}", "--rationales")
        assert r.returncode == 0, r.stderr[-3000:]
        return (out / "validation_20_predictions.jsonl").read_text(), json.loads((out / "validation_20_metrics.json").read_text())

    preds, metrics = evaluate()
    assert metrics["examples"] == 24 and len(preds.splitlines()) == 24
    rng = random.Random(7)
    other = "zebra yak walrus vole urchin tapir seal raven quail otter".split()
    with open(train, "w") as f:  # the same file name, other rows and words
        for _ in range(150):
            words = [rng.choice(other) for _ in range(rng.randint(2, 9))]
            row = {"input": " ".join(words), "label": words[-1], "rationale": f"the last word is {words[-1]}"}
            f.write(json.dumps({**row, "llm_label": words[-1]}) + "\n")
    # the premise: a vocabulary rebuilt from the rewritten file gives the validation inputs other ids
    rebuilt = spm.SentencePieceProcessor(
        model_file=str(vocab.train_sentencepiece(vocab.benchmark_texts(str(train)), 200, tmp_path / "rebuilt.model"))
    )
    saved = spm.SentencePieceProcessor(model_file=str(model_dir / "spiece.model"))
    inputs = [json.loads(x)["input"] for x in val.read_text().splitlines()]
    assert [saved.encode(t) for t in inputs] != [rebuilt.encode(t) for t in inputs]

    assert evaluate() == (preds, metrics)


# --- users' data -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dss_train_on_rows_without_rationales_is_one_line_saying_what_to_do(tmp_path):
    """The README allows rows without rationales; DSS learns from them: one line saying what to do, no traceback."""
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps({"input": f"w{i} x", "label": f"w{i}"}) + "\n" for i in range(40)))
    model_dir = tmp_path / "m"
    r = subprocess.run(train_cmd(model_dir, f), env=xla_env(1), capture_output=True, text=True, timeout=900)
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = _error_lines(r.stderr, "dss-train")
    assert f"{f}: none of its 40 rows has a 'rationale'" in line and "dss-teacher" in line and "finetune" in line
    assert "Traceback" not in r.stderr and "StopIteration" not in r.stderr and not model_dir.exists()
