"""Orbax checkpoints: pretrained parameter checkpoints (what training starts from, what export reads).

A dss_jax *pretrained* checkpoint is a directory with ``params/`` (an Orbax PyTree of the unscanned,
T5X-layout parameter tree), ``dss_config.json`` (the T5Config) and optionally ``spiece.model``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dss_jax.convert import Params, check_tree, flatten, stack_layers, unstack_layers
from dss_jax.model import T5Config

CONFIG_FILE = "dss_config.json"


def save_pretrained(
    path: str | os.PathLike, params: Params, cfg: T5Config, spiece_model: str | os.PathLike | None = None
) -> Path:
    """Writes params (any layout; stored unscanned), config and vocabulary."""
    path = Path(path).resolve()
    if cfg.scan_layers:
        params = unstack_layers(jax.device_get(params))
    check_tree(flatten(params), cfg, "parameter tree")
    path.mkdir(parents=True, exist_ok=True)
    if (path / "params").exists():
        shutil.rmtree(path / "params")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path / "params", jax.tree.map(np.asarray, params))
    ckptr.wait_until_finished()
    stored = cfg.replace(scan_layers=False)
    (path / CONFIG_FILE).write_text(json.dumps(stored.to_dict(), indent=2) + "\n")
    if spiece_model is not None:
        shutil.copy(spiece_model, path / "spiece.model")
    return path


def read_config(path: str | os.PathLike) -> T5Config:
    f = Path(path) / CONFIG_FILE
    if not f.exists():
        raise FileNotFoundError(f"{f} not found: not a dss_jax pretrained checkpoint (make one with dss-convert)")
    return T5Config.from_dict(json.loads(f.read_text()))


def load_pretrained(path: str | os.PathLike, cfg: T5Config | None = None) -> tuple[Params, T5Config, Path | None]:
    """Reads (params as numpy, config, spiece.model path or None).

    With ``cfg`` the stored architecture must match it (numerics such as dtype, remat and scan may differ);
    params come back in ``cfg``'s layout (stacked when ``cfg.scan_layers``).
    """
    path = Path(path).resolve()
    stored = read_config(path)
    if cfg is not None:
        arch = ("dtype", "param_dtype", "remat_policy", "scan_layers", "dropout_rate")
        a = {k: v for k, v in stored.to_dict().items() if k not in arch}
        b = {k: v for k, v in cfg.to_dict().items() if k not in arch}
        diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {x!r} vs config {y!r}" for k, (x, y) in diff.items())
            raise ValueError(f"{path}: checkpoint architecture differs from the model config ({lines})")
    else:
        cfg = stored
    params = ocp.StandardCheckpointer().restore(path / "params")
    params = jax.tree.map(np.asarray, params)
    check_tree(flatten(params), cfg, str(path / "params"))
    if cfg.scan_layers:
        params = stack_layers(params)
    spm = path / "spiece.model"
    return params, cfg, spm if spm.exists() else None


def tree_shapes(tree: Any) -> Any:
    return jax.tree.map(lambda x: tuple(x.shape), tree)
