"""``dss-sweep``: a grid of gin overrides run one after another, or emitted as launcher commands.

    dss-sweep --gin_file=runs/quickstart.gin --root runs/sweep \
        --grid losses.LossConfig.alpha=0.3,0.5,0.7 --grid registry.DataOptions.train_fraction=0.25,1.0 \
        [--gin.TRAIN_STEPS=100] [--launcher "python launch/tpu_vm.py --name X --zone Z --accelerator_type v4-8 --"]

Every combination trains into ``ROOT/<name>`` (``name`` from its overrides) with ``sweep.json`` recording
them; finished runs (``summary.json`` present) are skipped, an interrupted one resumes. ``dss-report --root
ROOT`` turns the results into a table and plots.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from dss_jax import configs


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    files, bindings, rest = configs.split_gin_args(argv)
    p = argparse.ArgumentParser(prog="dss-sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--grid", action="append", default=[], help="NAME=V1,V2,... (repeatable; the grid is their product)")
    p.add_argument("--launcher", default=None, help="print each run as this launcher's command instead of running it")
    p.add_argument("--print_only", action="store_true", help="print the dss-train commands, run nothing")
    a = p.parse_args(rest)
    if not files:
        p.error("--gin_file is required")
    root = Path(a.root)
    combos = expand(a.grid)
    failures = 0
    for i, combo in enumerate(combos, 1):
        model_dir = root / run_name(combo)
        cmd = ["dss-train", *[f"--gin_file={f}" for f in files], f"--model_dir={model_dir}"]
        cmd += [f"--gin.{b.replace(' = ', '=')}" for b in bindings] + [f"--gin.{k}={v}" for k, v in combo.items()]
        if a.launcher:
            print(f"{a.launcher} {shlex.join(cmd)}")
            continue
        if a.print_only:
            print(shlex.join(cmd))
            continue
        if (model_dir / "summary.json").exists():
            print(f"[{i}/{len(combos)}] {model_dir.name}: done, skipped", file=sys.stderr)
            continue
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "sweep.json").write_text(json.dumps({"overrides": combo, "common": bindings, "gin_files": files}, indent=2))
        print(f"[{i}/{len(combos)}] {model_dir.name}", file=sys.stderr, flush=True)
        argv_py = [sys.executable, "-m", "dss_jax.train", *cmd[1:]]
        if subprocess.run(argv_py).returncode != 0:
            failures += 1
            print(f"[{i}/{len(combos)}] {model_dir.name}: FAILED", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
