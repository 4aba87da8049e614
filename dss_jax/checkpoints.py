"""Orbax checkpoints: pretrained parameter checkpoints, and parameters out of the trainer's checkpoints.

A dss_jax *pretrained* checkpoint (what training starts from) is a directory with ``params/`` (an Orbax
PyTree of the unscanned, T5X-layout parameter tree), ``dss_config.json`` (the T5Config) and optionally
``spiece.model``. A *trainer* checkpoint is ``<model_dir>/checkpoints/<step>/state`` (the whole train state);
the eval, infer and export paths read only its parameters, onto any mesh.
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


def resolve_step_dir(path: str | os.PathLike) -> Path:
    """A trainer checkpoint step dir from: the step dir itself, ``<model_dir>/checkpoints``, or a model dir
    (its best checkpoint by validation accuracy when one is recorded, else its latest)."""
    path = Path(path).resolve()
    if (path / "state").is_dir():
        return path
    ckpts = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit() and (p / "state").is_dir()) if ckpts.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{path}: no trainer checkpoints (expected <model_dir>/checkpoints/<step>/state)")
    best = ocp.CheckpointManager(
        ckpts, options=ocp.CheckpointManagerOptions(read_only=True, best_fn=lambda m: m["accuracy"], best_mode="max")
    ).best_step()
    return ckpts / str(best if best is not None else steps[-1])


def restore_train_params(step_dir: str | os.PathLike, cfg: T5Config, shardings: Any = None) -> Any:
    """The parameters of a trainer checkpoint (optimizer state is not read), placed with ``shardings`` (any
    mesh, not necessarily the training one). A checkpoint of another architecture fails naming the tensor."""
    from flax import linen as nn

    from dss_jax.convert import CheckpointMismatchError
    from dss_jax.trainer import abstract_boxed_params

    state_dir = Path(step_dir) / "state"
    if not state_dir.is_dir():
        raise FileNotFoundError(f"{state_dir} not found: not a trainer checkpoint step")
    meta = ocp.PyTreeCheckpointer().metadata(state_dir)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    stored = {k: tuple(v.shape) for k, v in flatten(dict(tree)["params"]).items()}
    abstract = nn.meta.unbox(abstract_boxed_params(cfg))
    want = {k: tuple(v.shape) for k, v in flatten(abstract).items()}
    problems = [f"missing tensor {k} (model expects {want[k]})" for k in sorted(set(want) - set(stored))]
    problems += [f"unexpected tensor {k} {stored[k]}" for k in sorted(set(stored) - set(want))]
    problems += [
        f"tensor {k} has shape {stored[k]}, model expects {want[k]}"
        for k in sorted(set(want) & set(stored))
        if stored[k] != want[k]
    ]
    if problems:
        raise CheckpointMismatchError(f"{state_dir} does not match the model config:\n  " + "\n  ".join(problems))
    if shardings is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    target = {"params": abstract}
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir,
        args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        ),
    )
    return restored["params"]
