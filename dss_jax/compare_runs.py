"""``dss-report``: collect model dirs into a CSV/markdown table and paper-style plots.

    dss-report --root outputs/sweep [--out outputs/sweep/report]
    dss-report --runs outputs/quickstart/dss outputs/quickstart/finetune     # finished runs side by side

Reads each run's ``config.gin`` (method, label source, task weight a, data fraction, model size, seed) and
``summary.json`` / ``test_metrics.json``; writes ``results.csv``, ``results.md``, and, with matplotlib,
``accuracy_vs_data.png`` (accuracy against percent of training data, one line per method and a) and
``accuracy_vs_size.png`` (accuracy against parameters, one line per method).
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

FIELDS = {
    "benchmark": "pipeline.SeqioData.benchmark",
    "method": "pipeline.SeqioData.method",
    "label_source": "pipeline.SeqioData.label_source",
    "alpha": "losses.LossConfig.alpha",
    "train_fraction": "registry.DataOptions.train_fraction",
    "seed": "train.train.seed",
    "d_model": "model.T5Config.d_model",
    "num_layers": "model.T5Config.num_encoder_layers",
}


# Values a run's config.gin leaves out because they were not bound: the configurables' defaults.
DEFAULTS = {"method": "dss", "label_source": "gold", "alpha": 0.5, "train_fraction": 1.0, "seed": 0}


def read_gin_values(path: Path) -> dict[str, Any]:
    """``NAME = VALUE`` lines of an operative gin config (values parsed as literals, never evaluated)."""
    out: dict[str, Any] = {}
    macros: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        if "=" not in line or line.lstrip().startswith(("#", "from ", "import ")):
            continue
        name, value = (x.strip() for x in line.split("=", 1))
        try:
            parsed: Any = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = macros.get(value[1:], value) if value.startswith("%") else value
        if "." not in name:
            macros[name] = parsed
        out[name] = parsed
    return out


def collect(root: Path) -> list[dict[str, Any]]:
    rows = []
    for summary_file in sorted(root.glob("**/summary.json")):
        d = summary_file.parent
        gin_values = read_gin_values(d / "config.gin") if (d / "config.gin").exists() else {}
        summary = json.loads(summary_file.read_text())
        row: dict[str, Any] = {"run": str(d.relative_to(root))}
        for k, name in FIELDS.items():
            row[k] = gin_values.get(name, DEFAULTS.get(k))
        if row["method"] != "dss":
            row["alpha"] = None  # the task weight a is a DSS setting; the baselines' loss has no a
        cfg_file = d / "dss_config.json"
        if cfg_file.exists():
            import jax

            from dss_jax.checkpoints import read_config
            from dss_jax.params import abstract_boxed_params

            cfg = read_config(d)
            row["params_m"] = round(sum(x.size for x in jax.tree_util.tree_leaves(abstract_boxed_params(cfg))) / 1e6, 2)
            # runs of a T5Gemma family bind gemma.GemmaConfig, not the T5 names above
            row["d_model"] = row["d_model"] if row["d_model"] is not None else cfg.d_model
            row["num_layers"] = row["num_layers"] if row["num_layers"] is not None else cfg.num_encoder_layers
        val = summary.get("validation") or {}
        test = summary.get("test") or {}
        row["validation_accuracy"] = next((v for k, v in val.items() if k.endswith("/accuracy")), None)
        row["test_accuracy"] = next((v for k, v in test.items() if k.endswith("/accuracy")), None)
        row["best_step"] = summary.get("best_step")
        paper = _paper_number(d / "sweep.json", row)
        if paper is not None:
            row["paper_test_accuracy"] = paper
        rows.append(row)
    return rows


def _paper_number(sweep_file: Path, row: dict[str, Any]) -> float | None:
    """The paper's test accuracy for this run's method and benchmark, when its sweep spec carries the paper's
    numbers (gin/sweeps/paper_t5_base.json) and the run keeps the paper's data (all of it)."""
    if not sweep_file.exists():
        return None
    paper = json.loads(sweep_file.read_text()).get("paper") or {}
    if float(row.get("train_fraction") or 1.0) != 1.0:
        return None
    return (paper.get("test_accuracy") or {}).get(row.get("method"), {}).get(row.get("benchmark"))


SETTING = ("benchmark", "method", "label_source", "alpha", "train_fraction", "d_model", "num_layers")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs that differ only in their seed, pooled: count, mean and sample standard deviation of the accuracies."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in SETTING), []).append(r)
    out = []
    for key, members in groups.items():
        agg: dict[str, Any] = dict(zip(SETTING, key, strict=True))
        agg["seeds"] = ",".join(str(m.get("seed")) for m in members)
        for metric in ("validation_accuracy", "test_accuracy"):
            vals = [float(m[metric]) for m in members if m.get(metric) is not None]
            agg[f"{metric}_mean"] = statistics.fmean(vals) if vals else None
            agg[f"{metric}_sd"] = statistics.stdev(vals) if len(vals) > 1 else None
        paper = {m.get("paper_test_accuracy") for m in members} - {None}
        if paper:
            agg["paper_test_accuracy"] = paper.pop()
        out.append(agg)
    return out


def _markdown(rows: list[dict[str, Any]]) -> list[str]:
    cols = list(dict.fromkeys(c for r in rows for c in r)) if rows else ["run"]
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return lines + ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]


def write_tables(rows: list[dict[str, Any]], out: Path) -> None:
    """results.csv and results.md (one line per run); with several seeds of a setting, or the paper's numbers,
    results.md also pools the seeds: mean and standard deviation beside the paper's test accuracy."""
    out.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(c for r in rows for c in r)) if rows else ["run"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    lines = _markdown(rows)
    pooled = aggregate(rows)
    if len(pooled) < len(rows) or any("paper_test_accuracy" in r for r in pooled):
        lines += ["", "Per setting (seeds pooled: mean, sample standard deviation):", "", *_markdown(pooled)]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict[str, Any]], out: Path, metric: str = "test_accuracy") -> list[Path]:
    """accuracy_vs_data[_<benchmark>].png (one line per method and a; seeds averaged) and, with several model
    sizes, accuracy_vs_size.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []
    rows = [r for r in rows if r.get(metric) is not None or r.get("validation_accuracy") is not None]
    if not rows:
        return made
    key = metric if any(r.get(metric) is not None for r in rows) else "validation_accuracy"
    ylabel = f"{key.replace('_', ' ')} (%)"
    pooled = [r for r in aggregate(rows) if r.get(f"{key}_mean") is not None]
    benchmarks = sorted({str(r.get("benchmark")) for r in pooled})
    for bench in benchmarks:
        groups: dict[str, list] = {}
        for r in (r for r in pooled if str(r.get("benchmark")) == bench):
            label = f"{r['method']}" + (f" (a={r['alpha']})" if r["method"] == "dss" else "")
            groups.setdefault(label, []).append((100 * float(r["train_fraction"]), r[f"{key}_mean"]))
        name = "accuracy_vs_data.png" if len(benchmarks) == 1 else f"accuracy_vs_data_{bench}.png"
        made.append(_line_plot(plt, groups, "% of training data", ylabel, f"{bench}: accuracy vs training data", out / name))
    sized = [r for r in rows if r.get("params_m")]
    if len({r["params_m"] for r in sized}) > 1:
        by_method: dict[str, list] = {}
        for r in sized:
            by_method.setdefault(r["method"], []).append((r["params_m"], r[key]))
        made.append(_line_plot(plt, by_method, "student parameters (M)", ylabel, None, out / "accuracy_vs_size.png", log_x=True))
    return made


def _line_plot(
    plt: Any, groups: dict[str, list], xlabel: str, ylabel: str, title: str | None, path: Path, log_x: bool = False
) -> Path:
    """One line per group of (x, y) points, written to ``path``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in sorted(groups.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dss-report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="a folder of model dirs (a dss-sweep root)")
    p.add_argument("--runs", nargs="+", default=None, help="model dirs to print side by side (e.g. DSS vs finetuning)")
    p.add_argument("--out", default=None, help="default: ROOT/report")
    a = p.parse_args(argv)
    if a.runs:
        from dss_jax import run_summary

        missing = [d for d in a.runs if not (Path(d) / "summary.json").exists()]
        if missing:
            print(f"dss-report: no summary.json in {', '.join(missing)} (has the run finished?)", file=sys.stderr)
            return 2
        print(run_summary.compare([Path(d) for d in a.runs]))
        return 0
    if not a.root:
        p.error("give --root (a sweep) or --runs (model dirs)")
    root = Path(a.root)
    rows = collect(root)
    if not rows:
        print(f"dss-report: no finished runs (summary.json) under {root}", file=sys.stderr)
        return 2
    out = Path(a.out) if a.out else root / "report"
    write_tables(rows, out)
    made = plot(rows, out)
    print((out / "results.md").read_text())
    print("wrote " + ", ".join(str(x) for x in [out / "results.csv", out / "results.md", *made]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
