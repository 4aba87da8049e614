"""The parameter tree: one home for its paths, its abstract shape per config, its checks and its layouts.

The tree is T5X's (``encoder/layers_0/attention/query/kernel``...); with ``scan_layers`` the per-layer subtrees
are stacked under ``layers`` with a leading layer axis. Conversion (convert.py), checkpoints (checkpoints.py) and
the trainer read trees through these functions, so "what tree does this config expect" is answered once.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dss_jax.model import ModelConfig, build

Params = dict[str, Any]
Flat = dict[str, np.ndarray]


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not match the model: names the tensors and both shapes."""


def flatten(tree: Params, prefix: str = "") -> Flat:
    """Nested dict -> {"a/b/c": leaf}."""
    out: Flat = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def unflatten(flat: Flat) -> Params:
    tree: Params = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def abstract_boxed_params(cfg: ModelConfig) -> Any:
    """The config's parameter tree as shapes with logical-axis boxes (nothing allocated), in its own layout."""
    model = build(cfg)
    dummy = jnp.ones((1, 8), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy, dummy))["params"]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter paths and shapes of ``cfg``'s tree in its own layout (stacked when ``cfg.scan_layers``)."""
    from flax import linen as nn

    return {k: tuple(v.shape) for k, v in flatten(nn.meta.unbox(abstract_boxed_params(cfg))).items()}


def check_shapes(got: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]], source: str) -> None:
    """Fails naming every missing, extra or mis-shaped tensor (with both shapes)."""
    problems = [f"missing tensor {k} (model expects {want[k]})" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected tensor {k} (shape {got[k]})" for k in sorted(set(got) - set(want))]
    problems += [
        f"tensor {k} has shape {got[k]}, model expects {want[k]}" for k in sorted(set(want) & set(got)) if got[k] != want[k]
    ]
    if problems:
        raise CheckpointMismatchError(f"{source} does not match the model config:\n  " + "\n  ".join(problems))


def check_tree(flat: Flat, cfg: ModelConfig, source: str) -> None:
    """``flat`` (unscanned layout) against the unscanned tree of ``cfg``."""
    check_shapes({k: tuple(v.shape) for k, v in flat.items()}, expected_shapes(cfg.replace(scan_layers=False)), source)


def stack_layers(params: Params) -> Params:
    """``layers_<i>`` subtrees -> one ``layers`` subtree with a leading layer axis (scan_layers layout)."""
    out = dict(params)
    for stack in ("encoder", "decoder"):
        sub = dict(out[stack])
        names = sorted((k for k in sub if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
        if names:
            sub["layers"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *[sub.pop(n) for n in names])
        out[stack] = sub
    return out


def unstack_layers(params: Params) -> Params:
    """Inverse of :func:`stack_layers`."""
    out = dict(params)
    for stack in ("encoder", "decoder"):
        sub = dict(out[stack])
        if "layers" in sub:
            layers = sub.pop("layers")
            n = jax.tree_util.tree_leaves(layers)[0].shape[0]
            for i in range(n):
                sub[f"layers_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x)[i], layers)
        out[stack] = sub
    return out
