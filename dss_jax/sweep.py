"""``dss-sweep``: a grid of gin overrides run one after another, or emitted as launcher commands.

    dss-sweep --gin_file=runs/quickstart.gin --root outputs/sweep \
        --grid losses.LossConfig.alpha=0.3,0.5,0.7 --grid registry.DataOptions.train_fraction=0.25,1.0 \
        [--gin.TRAIN_STEPS=100] [--launcher "python launch/tpu_vm.py --name X --zone Z --accelerator_type v4-8 --"]
    dss-sweep --spec paper_t5_base --root outputs/paper --gin.INIT_CHECKPOINT="'/ckpt/base'" \
        --gin.SPM_PATH="'/ckpt/base/spiece.model'" [--only BENCHMARK="'svamp'"]

Every combination trains into ``ROOT/<name>`` (``name`` from its overrides) with ``sweep.json`` recording
them; finished runs (``summary.json`` present) are skipped, an interrupted one resumes. ``dss-report --root
ROOT`` turns the results into a table and plots.

``--spec`` names a JSON file in gin/sweeps/ (or a path): ``arms`` (name -> the arm's gin files), ``grid``
(binding -> values, crossed with every arm) and optionally ``paper`` (the paper's numbers, which dss-report
prints beside the run's). Runs go to ``ROOT/<arm>/<name>``; gin files and bindings given on the command line
come after the arm's, so they apply to every run (``runs/paper_cpu_check.gin`` makes a whole spec a tiny CPU
rehearsal).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from dss_jax import gin_utils


def expand(grid: list[str]) -> list[dict[str, str]]:
    """['a=1,2', 'b=x'] -> [{'a': '1', 'b': 'x'}, {'a': '2', 'b': 'x'}]."""
    axes = []
    for g in grid:
        if "=" not in g:
            raise SystemExit(f"--grid {g!r}: expected NAME=V1,V2,...")
        name, values = g.split("=", 1)
        axes.append([(name.strip(), v.strip()) for v in values.split(",") if v.strip()])
    return [dict(combo) for combo in itertools.product(*axes)]


def run_name(overrides: dict[str, str]) -> str:
    parts = [f"{k.split('.')[-1]}={v.strip(chr(39)).strip(chr(34))}" for k, v in overrides.items()]
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(parts)) or "default"


def _unquote(v: str) -> str:
    return v.strip().strip("'\"")


def load_spec(name: str) -> dict:
    """A sweep spec by name (gin/sweeps/NAME.json) or path; errors name the file and the missing field."""
    path = Path(name) if name.endswith(".json") else gin_utils.GIN_DIR / "sweeps" / f"{name}.json"
    if not path.exists():
        known = sorted(p.stem for p in (gin_utils.GIN_DIR / "sweeps").glob("*.json"))
        raise SystemExit(f"dss-sweep: no sweep spec {path} (known: {', '.join(known)})")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"dss-sweep: {path}: line {e.lineno}: {e.msg}") from None
    for field in ("arms", "grid"):
        if not isinstance(spec.get(field), dict) or not spec[field]:
            raise SystemExit(f"dss-sweep: {path}: '{field}' must be a non-empty object")
    return {**spec, "name": path.stem}


def expand_grid(
    root: Path, files: list[str], grid: list[str], spec: dict | None, only: list[str], only_arms: Sequence[str] = ()
) -> list[tuple[Path, list[str], dict[str, str], str | None]]:
    """(model dir, gin files, overrides, arm) per run; ``only`` keeps the runs whose overrides match, ``only_arms``
    the spec's arms named (all when empty)."""
    keep = expand(only)[0] if only else {}
    if spec is None:
        arms: dict[str | None, list[str]] = {None: files}
        combos = expand(grid)
    else:
        unknown = sorted(set(only_arms) - set(spec["arms"]))
        if unknown:
            raise SystemExit(f"dss-sweep: --arms {','.join(unknown)}: not an arm of {spec['name']} ({', '.join(spec['arms'])})")
        arms = {arm: [*arm_files, *files] for arm, arm_files in spec["arms"].items() if not only_arms or arm in only_arms}
        combos = expand([f"{k}={','.join(v)}" for k, v in spec["grid"].items()] + grid)
    runs = []
    for arm, arm_files in arms.items():
        for combo in combos:
            if any(_unquote(combo.get(k, "")) != _unquote(v) for k, v in keep.items()):
                continue
            model_dir = root / arm / run_name(combo) if arm else root / run_name(combo)
            runs.append((model_dir, arm_files, combo, arm))
    return runs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    files, bindings, rest = gin_utils.split_gin_args(argv)
    p = argparse.ArgumentParser(prog="dss-sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--grid", action="append", default=[], help="NAME=V1,V2,... (repeatable; the grid is their product)")
    p.add_argument("--spec", default=None, help="a sweep spec: a name in gin/sweeps/ (paper_t5_base, ...) or a .json path")
    p.add_argument("--only", action="append", default=[], help="NAME=VALUE: run only the combinations with this override")
    p.add_argument("--arms", default="", help="A,B,...: run only these arms of --spec (e.g. dss,finetune)")
    p.add_argument("--launcher", default=None, help="print each run as this launcher's command instead of running it")
    p.add_argument("--print_only", action="store_true", help="print the dss-train commands, run nothing")
    a = p.parse_args(rest)
    spec = load_spec(a.spec) if a.spec else None
    if not files and spec is None:
        p.error("--gin_file or --spec is required")
    root = Path(a.root)
    if a.arms and spec is None:
        p.error("--arms needs --spec")
    runs = expand_grid(root, files, a.grid, spec, a.only, [x for x in a.arms.split(",") if x])
    if not runs:
        p.error(f"no run matches --only {' '.join(a.only)}")
    failures = 0
    for i, (model_dir, run_files, combo, arm) in enumerate(runs, 1):
        cmd = ["dss-train", *[f"--gin_file={f}" for f in run_files], f"--model_dir={model_dir}"]
        cmd += [f"--gin.{b.replace(' = ', '=')}" for b in bindings] + [f"--gin.{k}={v}" for k, v in combo.items()]
        label = f"{arm}/{model_dir.name}" if arm else model_dir.name
        if a.launcher:
            print(f"{a.launcher} {shlex.join(cmd)}")
            continue
        if a.print_only:
            print(shlex.join(cmd))
            continue
        if (model_dir / "summary.json").exists():
            print(f"[{i}/{len(runs)}] {label}: done, skipped", file=sys.stderr)
            continue
        model_dir.mkdir(parents=True, exist_ok=True)
        record = {"overrides": combo, "common": bindings, "gin_files": run_files, "arm": arm}
        if spec is not None:  # the paper's numbers travel with the run, for dss-report's paper column
            record.update(spec=spec["name"], paper=spec.get("paper"))
        (model_dir / "sweep.json").write_text(json.dumps(record, indent=2))
        print(f"[{i}/{len(runs)}] {label}", file=sys.stderr, flush=True)
        argv_py = [sys.executable, "-m", "dss_jax.train", *cmd[1:]]
        if subprocess.run(argv_py).returncode != 0:
            failures += 1
            print(f"[{i}/{len(runs)}] {label}: FAILED", file=sys.stderr)
    if failures:
        print(f"dss-sweep: {failures} of {len(runs)} runs failed (rerun the same command to retry them)", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
