"""Orbax checkpoints: pretrained parameter checkpoints, and parameters out of the trainer's checkpoints.

A dss_jax *pretrained* checkpoint (what training starts from) is a directory with ``params/`` (an Orbax
PyTree of the unscanned, T5X-layout parameter tree), ``dss_config.json`` (the model config, with its family) and optionally
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

from dss_jax.files import saved_steps
from dss_jax.integrity import (
    CheckpointDamagedError,
    checksums_expected,
    read_checksums,
    read_or_damaged,
    stored_tree,
    verify_checksums,
)
from dss_jax.model import ModelConfig, config_from_dict
from dss_jax.params import Params, abstract_boxed_params, check_shapes, check_tree, flatten, stack_layers, unstack_layers

CONFIG_FILE = "dss_config.json"


def save_pretrained(
    path: str | os.PathLike, params: Params, cfg: ModelConfig, spiece_model: str | os.PathLike | None = None
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


def read_config(path: str | os.PathLike) -> ModelConfig:
    f = Path(path) / CONFIG_FILE
    if not f.exists():
        raise FileNotFoundError(f"{f} not found: not a dss_jax pretrained checkpoint (make one with dss-convert)")
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        return config_from_dict(d)
    except (ValueError, TypeError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{f} is not a valid model config: {e}") from None


def load_pretrained(path: str | os.PathLike, cfg: ModelConfig | None = None) -> tuple[Params, ModelConfig, Path | None]:
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
    steps = saved_steps(ckpts)
    if not steps:
        raise FileNotFoundError(f"{path}: no trainer checkpoints (expected <model_dir>/checkpoints/<step>/state)")
    best = ocp.CheckpointManager(
        ckpts, options=ocp.CheckpointManagerOptions(read_only=True, best_fn=lambda m: m["accuracy"], best_mode="max")
    ).best_step()
    return ckpts / str(best if best is not None else steps[-1])


def restore_train_params(step_dir: str | os.PathLike, cfg: ModelConfig, shardings: Any = None, tool: str = "dss-eval") -> Any:
    """The parameters of a trainer checkpoint (optimizer state is not read), placed with ``shardings`` (any
    mesh, not necessarily the training one). A checkpoint of another architecture fails naming the tensor; a
    damaged one (unreadable, or values that differ from its checksums) fails naming the step and the newest
    intact step beside it, so the user is pointed at a checkpoint that works rather than at a traceback
    (``tool``: the command the hint names)."""
    try:
        return _restore_train_params(Path(step_dir), cfg, shardings)
    except CheckpointDamagedError as e:
        intact = newest_intact_step_dir(Path(step_dir), cfg)
        hint = (
            f"; the newest intact checkpoint is {intact} ({tool} --checkpoint={intact})"
            if intact
            else "; no other intact checkpoint beside it"
        )
        raise CheckpointDamagedError(str(e) + hint) from None


def newest_intact_step_dir(damaged: Path, cfg: ModelConfig) -> Path | None:
    """The newest other step beside ``damaged`` whose parameters restore and verify (the error path only)."""
    ckpts = damaged.resolve().parent
    for s in reversed(saved_steps(ckpts)):
        if ckpts / str(s) == damaged.resolve():
            continue
        try:
            _restore_train_params(ckpts / str(s), cfg, None)
        except CheckpointDamagedError:
            continue
        return ckpts / str(s)
    return None


def _restore_train_params(step_dir: Path, cfg: ModelConfig, shardings: Any) -> Any:
    from flax import linen as nn

    state_dir = step_dir / "state"
    if not state_dir.is_dir():
        raise FileNotFoundError(f"{state_dir} not found: not a trainer checkpoint step")
    tree = stored_tree(state_dir)
    if not isinstance(tree, dict) or not isinstance(tree.get("params"), dict):
        raise CheckpointDamagedError(f"checkpoint step {step_dir.name} is damaged: its metadata lists no parameters")
    stored = {k: tuple(v.shape) for k, v in flatten(dict(tree)["params"]).items()}
    abstract = nn.meta.unbox(abstract_boxed_params(cfg))
    check_shapes(stored, {k: tuple(v.shape) for k, v in flatten(abstract).items()}, str(state_dir))
    if shardings is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    target = {"params": abstract}
    restored = read_or_damaged(
        lambda: ocp.PyTreeCheckpointer().restore(
            state_dir,
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
            ),
        ),
        step_dir,
    )
    record = read_checksums(step_dir)
    verify_checksums({"params": restored["params"]}, record, step_dir, trusted_without=not checksums_expected(step_dir))
    return restored["params"]
