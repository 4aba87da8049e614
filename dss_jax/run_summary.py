"""The end-of-run table and loss curves of a model dir, and runs side by side.

``format_table`` renders ``summary.json``: per split the examples scored (a subset says so), the task's metric,
losses, and the task's trivial baselines, so a number is read against what doing nothing scores. ``compare``
puts several runs (DSS against standard finetuning, say) in one table. ``plot_losses`` writes
``loss_curves.png`` from ``metrics.jsonl`` when matplotlib is installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CLEAR_MARGIN = 2.0  # points; closer than this to a trivial baseline is not learning we would claim
PRETRAINED_HINT = (
    "not clearly above the trivial baseline (within 2 points): this run has not learned the task. From scratch at "
    "this size that is expected for CQA and SVAMP; the paper's numbers need a pretrained T5 (runs/dss.gin with a "
    "checkpoint converted by dss-convert)"
)


def _fmt(v: Any, digits: int = 1) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _examples(row: dict[str, Any]) -> str:
    n, total = row.get("examples"), row.get("total")
    if n is None:
        return "-"
    text = f"{int(n)}/{total}" if total else str(int(n))
    return text + (" (subset)" if row.get("subset") else "")


def format_table(summary: dict[str, Any], model_dir: Path | None = None) -> str:
    """A short plain-text report of one run."""
    lines = []
    splits = summary.get("splits") or {}
    if model_dir is not None:
        lines.append(f"model dir: {model_dir}  (checkpoint {summary.get('best_step')} selected on validation)")
    if splits:
        rank = any("rank_accuracy" in row for row in splits.values())
        lines.append(
            f"{'split':<12}{'examples':>20}{'accuracy %':>12}{'label loss':>12}{'rationale loss':>16}{'listed choice %':>17}"
            + (f"{'rank acc %':>12}" if rank else "")
        )
        for name, row in splits.items():
            lines.append(
                f"{name:<12}{_examples(row):>20}{_fmt(row.get('accuracy')):>12}{_fmt(row.get('label_loss'), 3):>12}"
                f"{_fmt(row.get('rationale_loss'), 3):>16}{_fmt(row.get('listed_choice_share')):>17}"
                + (f"{_fmt(row.get('rank_accuracy')):>12}" if rank else "")
            )
    base = {k: v for k, v in (summary.get("baselines") or {}).items() if k != "split"}
    if base:
        split = summary["baselines"].get("split")
        lines.append(f"trivial baselines on {split}:")
        lines += [f"  {k}: {v:.1f}%" for k, v in base.items()]
        acc = (splits.get(split) or {}).get("accuracy")
        if acc is not None:
            best = max(base.values())
            margin = acc - best
            verdict = f"above the best trivial baseline by {margin:.1f} points" if margin > CLEAR_MARGIN else PRETRAINED_HINT
            lines.append(f"  -> {split} accuracy {acc:.1f}%: {verdict}")
    fl = summary.get("losses_first_last") or {}
    if fl:
        lines.append(
            "train loss first -> last logged step: " + ", ".join(f"{k} {_fmt(a, 3)} -> {_fmt(b, 3)}" for k, (a, b) in fl.items())
        )
    if "train" in splits and "test" in splits and splits["train"].get("accuracy") is not None:
        gap = splits["train"]["accuracy"] - (splits["test"].get("accuracy") or 0.0)
        lines.append(f"train subset accuracy - test accuracy: {gap:.1f} points (a large gap means memorising)")
    if model_dir is not None and (model_dir / "loss_curves.png").exists():
        lines.append(f"loss curves: {model_dir / 'loss_curves.png'}")
    return "\n".join(lines)


def compare(run_dirs: list[Path]) -> str:
    """Runs side by side: method, steps, examples, accuracy per split, and the baselines of the first run."""
    rows: list[tuple] = []
    base: dict[str, Any] = {}
    for d in run_dirs:
        s = json.loads((d / "summary.json").read_text())
        base = base or {k: v for k, v in (s.get("baselines") or {}).items() if k != "split"}
        sp = s.get("splits") or {}
        rows.append((d.name, s.get("step"), *(sp.get(k, {}).get("accuracy") for k in ("train", "validation", "test"))))
    out = [f"{'run':<24}{'steps':>8}{'train subset %':>16}{'validation %':>14}{'test %':>10}"]
    out += [f"{r[0]:<24}{_fmt(r[1]):>8}{_fmt(r[2]):>16}{_fmt(r[3]):>14}{_fmt(r[4]):>10}" for r in rows]
    out += [f"{'baseline: ' + k:<62}{v:>10.1f}" for k, v in base.items()]
    return "\n".join(out)


def plot_losses(model_dir: Path) -> Path | None:
    """loss_curves.png: train label/rationale loss per logged step and validation losses, if matplotlib is there."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    f = model_dir / "metrics.jsonl"
    if not f.exists():
        return None
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style in (("train", "-"), ("eval", "o--")):
        pts = [r for r in rows if r.get("kind") == kind]
        for name in ("label_loss", "rationale_loss"):
            xs = [r["step"] for r in pts for k in r if k == name or k.endswith("/" + name)]
            ys = [r[k] for r in pts for k in r if k == name or k.endswith("/" + name)]
            if xs:
                ax.plot(xs, ys, style, label=f"{kind} {name.replace('_', ' ')}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(model_dir.name)
    ax.legend()
    fig.tight_layout()
    path = model_dir / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
