"""Device mesh, logical axis rules, and the shardings of parameters, optimizer state and batches.

The model names every parameter axis (vocab, embed, mlp, heads, joined_kv, kv, relpos_buckets, layers); the
rules here map those names onto mesh axes ``data``, ``fsdp`` and ``model``, as T5X does. A name that no rule
mentions is an error, not silently replicated.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import gin
import jax
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

if TYPE_CHECKING:  # annotations only: partitioning needs no model code
    from dss_jax.model import ModelConfig

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "model")

# T5X's defaults plus FSDP: batch over data (and fsdp), the large weight axes over model, embed over fsdp.
# Rules are tried in order; an axis whose mesh axes are already used in the same spec falls to the next.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("joined_kv", "model"),
    ("kv", None),
    ("embed", "fsdp"),
    ("embed", None),
    ("length", None),
    ("relpos_buckets", None),
    ("layers", None),
)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape: -1 in one axis takes the remaining devices. Parallelism is data x fsdp x model."""

    data: int = -1
    fsdp: int = 1
    model: int = 1
    rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = [cfg.data, cfg.fsdp, cfg.model]
    if shape.count(-1) > 1:
        raise ValueError(f"MeshConfig: at most one axis may be -1, got data={cfg.data} fsdp={cfg.fsdp} model={cfg.model}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"MeshConfig: {len(devices)} devices do not divide by fsdp*model={known}")
        shape[shape.index(-1)] = len(devices) // known
    if -1 not in shape and int(np.prod(shape)) < len(devices):
        log.warning("mesh %s uses %d of %d devices", shape, int(np.prod(shape)), len(devices))
        devices = devices[: int(np.prod(shape))]
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"MeshConfig data={shape[0]} x fsdp={shape[1]} x model={shape[2]} != {len(devices)} devices")
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # CPU and some topologies: plain order is fine
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def validate_names(specs: Any, rules: Sequence[tuple[str, Any]]) -> None:
    """Every logical name in ``specs`` must have a rule (flax would replicate unknown names silently)."""
    known = {name for name, _ in rules}
    used: set[str] = set()
    for spec in jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)):
        for name in spec:
            if name is not None:
                used.update(name if isinstance(name, tuple) else (name,))
    unknown = used - known
    if unknown:
        raise ValueError(f"logical axis names without a partitioning rule: {sorted(unknown)}; rules: {sorted(known)}")


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    validate_names(logical_specs, rules)
    return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def params_shardings(abstract_boxed_params: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedShardings for an unboxed param tree, from the model's LogicallyPartitioned abstract params."""
    specs = nn.get_partition_spec(abstract_boxed_params)
    return logical_to_sharding(specs, mesh, rules)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Optimizer-state shardings: leaves shaped like their parameter take its sharding; others (factored
    Adafactor statistics, counters) are replicated (they are small)."""
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    replicated = NamedSharding(mesh, PartitionSpec())

    def for_param(leaf: Any, sharding: NamedSharding, param: Any) -> NamedSharding:
        return sharding if getattr(leaf, "shape", None) == param.shape else replicated

    def tree(state: Any) -> Any:
        return jax.tree.map(lambda _: replicated, state)

    try:
        mapped = optax.tree_map_params(
            tx,
            lambda leaf, s, p: for_param(leaf, s, p),
            abstract_state,
            params_shardings,
            abstract_params,
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
        )
        return mapped
    except Exception as e:  # pragma: no cover - optimizer states optax cannot map: replicate, loudly
        log.warning("optimizer state sharding fell back to replication: %s", e)
        return tree(abstract_state)


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> NamedSharding:
    return logical_to_sharding(PartitionSpec("batch", "length"), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over the mesh (one process: just a device_put)."""
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sharding) for k, v in local.items()}
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def maybe_initialize_distributed() -> None:
    """Joins a multi-host job when the launcher set DSS_COORDINATOR_ADDRESS/DSS_NUM_PROCESSES/DSS_PROCESS_ID
    (the local launcher), or DSS_AUTO_DISTRIBUTED=1 where jax finds the cluster itself (Cloud TPU VMs, SLURM)."""
    if os.environ.get("DSS_COORDINATOR_ADDRESS"):
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # CPU collectives (tests, rehearsals)
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["DSS_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["DSS_NUM_PROCESSES"]),
            process_id=int(os.environ["DSS_PROCESS_ID"]),
        )
    elif os.environ.get("DSS_AUTO_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def for_mesh(cfg: ModelConfig, mesh: Mesh) -> ModelConfig:
    """``cfg`` for steps whose rows are split over ``mesh``'s batch axes (data x fsdp): attention skips key blocks
    across the batch (``attention_skip='batch'``) instead of row by row, since a loop over rows cannot be split
    across devices (XLA gathers the rows, and every device computes every row's attention). One device or
    unsplit rows: ``cfg`` as it is."""
    if cfg.attention_skip != "auto" or mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1) == 1:
        return cfg
    return dataclasses.replace(cfg, attention_skip="batch")
