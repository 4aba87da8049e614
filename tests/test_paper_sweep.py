"""dss-sweep and dss-report: the paper's sweep specs expand to every arm of Table 2's comparison, a spec's arm with a
data grid runs end to end on CPU (tiny model) and dss-report prints the paper's numbers beside the run's; seeds of a
setting pool into mean and spread."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ONE_LAYER_PER_STACK, SHARED_DATA, write_data_subset, xla_env

from dss_jax import compare_runs, sweep


def test_specs_expand_to_every_arm_and_benchmark(tmp_path):
    spec = sweep.load_spec("paper_t5_base")
    runs = sweep.expand_grid(tmp_path, [], [], spec, [])
    assert len(runs) == 16  # 4 methods x 4 benchmarks
    assert {r[3] for r in runs} == {"finetune", "distill", "single_task", "dss"}
    dss_svamp = [r for r in sweep.expand_grid(tmp_path, ["extra.gin"], [], spec, ["BENCHMARK=svamp"]) if r[3] == "dss"]
    assert [(r[0].relative_to(tmp_path).as_posix(), r[1]) for r in dss_svamp] == [
        ("dss/BENCHMARK=svamp", ["runs/dss.gin", "extra.gin"])
    ]
    two = sweep.expand_grid(tmp_path, [], [], spec, ["BENCHMARK=cqa"], ["dss", "distill"])
    assert [r[3] for r in two] == ["distill", "dss"]  # in the spec's order
    with pytest.raises(SystemExit, match="--arms dsss: not an arm of paper_t5_base .*single_task"):
        sweep.expand_grid(tmp_path, [], [], spec, [], ["dss", "dsss"])
    curves = sweep.load_spec("paper_data_efficiency")
    assert len(sweep.expand_grid(tmp_path, [], [], curves, [])) == 3 * 4 * 5
    for arm_files in [*spec["arms"].values(), *curves["arms"].values()]:
        assert all((sweep.gin_utils.GIN_DIR / f).exists() for f in arm_files)


def test_the_paper_column_is_table_2_as_printed():
    """T5-Base at 100% of the data, test accuracy (%), Tables 1 and 2 of arXiv 2305.02301, to the printed digits."""
    assert sweep.load_spec("paper_t5_base")["paper"]["test_accuracy"] == {
        "finetune": {"esnli": 88.38, "anli1": 43.58, "cqa": 62.19, "svamp": 62.63},
        "single_task": {"esnli": 88.88, "anli1": 43.50, "cqa": 61.37, "svamp": 63.00},
        "dss": {"esnli": 89.51, "anli1": 49.58, "cqa": 63.29, "svamp": 65.50},
    }


def test_a_bad_spec_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"arms": {"dss": ["runs/dss.gin"]},\n "grid": }')
    with pytest.raises(SystemExit, match="bad.json: line 2"):
        sweep.load_spec(str(bad))
    with pytest.raises(SystemExit, match="known: .*paper_t5_base"):
        sweep.load_spec("no_such_spec")


def test_seeds_pool_into_mean_and_spread():
    rows = [
        {"benchmark": "esnli", "method": m, "alpha": 0.5, "train_fraction": 1.0, "seed": s, "test_accuracy": acc}
        for m, s, acc in [("dss", 0, 40.0), ("dss", 1, 44.0), ("dss", 2, 42.0), ("finetune", 0, 45.0)]
    ]
    pooled = {r["method"]: r for r in compare_runs.aggregate(rows)}
    assert pooled["dss"]["seeds"] == "0,1,2"
    assert pooled["dss"]["test_accuracy_mean"] == pytest.approx(42.0)
    assert pooled["dss"]["test_accuracy_sd"] == pytest.approx(2.0)
    assert pooled["finetune"]["test_accuracy_sd"] is None


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data/dss is not beside the repo")
def test_paper_spec_with_a_data_grid_runs_on_cpu_and_report_prints_the_paper_column(tmp_path):
    """The paper's DSS arm on a SVAMP subset at two data fractions (the spec's grid and a --grid on top), then
    dss-report: the paper's number stands beside the run with all of the data only, and the table, the CSV and the
    accuracy-vs-data plot are written."""
    root = tmp_path / "paper"
    data = write_data_subset(tmp_path / "data", "svamp", 48)  # every split is decoded in full at the end
    env = {**xla_env(1), "DSS_DATA_DIR": str(data), "DSS_TFDS_DIR": os.environ.get("DSS_TFDS_DIR", str(tmp_path / "t"))}
    cmd = [
        sys.executable,
        "-m",
        "dss_jax.sweep",
        "--spec=paper_t5_base",
        f"--root={root}",
        "--only",
        "BENCHMARK=svamp",
        "--arms=dss",  # the other arms differ only in their gin files (above: every arm expands, every file exists)
        "--grid",
        "registry.DataOptions.train_fraction=0.5,1.0",
        "--gin_file=runs/paper_cpu_check.gin",
        "--gin.TRAIN_STEPS=4",
        *ONE_LAYER_PER_STACK,
        "--gin.train.train.eval_every=4",
        "--gin.train.train.checkpoint_every=4",
        "--gin.train.train.report_train_examples=0",  # the table's train row is not compared with the paper
        "--gin.pipeline.SeqioData.max_eval_examples=16",
        "--gin.pipeline.SeqioData.inputs_length=64",
        "--gin.pipeline.SeqioData.targets_length=16",
        "--gin.optim.learning_rate_schedule.warmup_steps=0",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = ["dss/BENCHMARK=svamp,train_fraction=0.5", "dss/BENCHMARK=svamp,train_fraction=1.0"]
    assert sorted(p.relative_to(root).as_posix() for p in root.glob("*/*") if p.is_dir()) == runs
    for run in runs:
        summary = json.loads((root / run / "summary.json").read_text())
        assert summary["splits"]["test"]["examples"] == summary["splits"]["test"]["total"] == 48

    r = subprocess.run(
        [sys.executable, "-m", "dss_jax.compare_runs", f"--root={root}"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["run"]: row for row in compare_runs.collect(root)}
    assert rows[runs[1]]["paper_test_accuracy"] == 65.5
    assert "paper_test_accuracy" not in rows[runs[0]]  # the paper's number is for all of the data
    assert "paper_test_accuracy" in r.stdout and "65.50" in r.stdout
    table = (root / "report" / "results.md").read_text()
    assert all(f"| {run} | svamp | dss |" in table for run in runs), table
    assert (root / "report" / "accuracy_vs_data.png").stat().st_size > 1000
    assert len((root / "report" / "results.csv").read_text().splitlines()) == 3
