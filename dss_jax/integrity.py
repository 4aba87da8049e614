"""Checkpoint integrity: checksums written with every trainer checkpoint and verified at every restore, digests of
the data-iterator files saved beside it, and reads that turn any damage into one CheckpointDamagedError naming the
step."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dss_jax.files import atomic_write, saved_steps

CHECKSUM_ITEM = "checksums"
CHECKSUM_ALGORITHM = "dss-u32sum-fmix32/v1"
DATA_DIGEST_SUFFIX = ".sha256.json"


class CheckpointDamagedError(ValueError):
    """A checkpoint step that cannot be read, or whose values differ from the checksums written when it was saved."""


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: every input bit flips about half the output bits."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Two uint32 sums over an array's bit patterns: the plain sum and the sum of a hash of (bits, flat index).

    Sums modulo 2**32 do not depend on the order of the reduction, so the checksum is bit-identical whatever mesh
    or process layout holds the array: it is computed on device where the array lives (no host copy, no gather)
    and checked again after a restore onto another mesh. The flat index is built from iotas, not a reshape, so a
    sharded array is never relaid out.
    """
    x = jnp.asarray(x)
    bits = x.dtype.itemsize * 8
    if x.dtype == jnp.bool_:
        u = x.astype(jnp.uint32)
    elif bits <= 32:
        u = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)
    else:  # 64-bit leaves (jax_enable_x64 only): fold the two halves
        w = jax.lax.bitcast_convert_type(x, jnp.uint64)
        u = (w & np.uint64(0xFFFFFFFF)).astype(jnp.uint32) ^ _fmix32((w >> np.uint64(32)).astype(jnp.uint32))
    idx = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(x.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * np.uint32(stride % 2**32)
        stride *= x.shape[axis]
    plain = jnp.sum(u, dtype=jnp.uint32)
    mixed = jnp.sum(_fmix32(u + idx * np.uint32(0x9E3779B9)), dtype=jnp.uint32)  # position-dependent, non-linear
    return jnp.stack([plain, mixed])


@jax.jit
def _tree_checksums(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([_leaf_checksum(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def tree_checksums(tree: Any) -> dict[str, str]:
    """``{"params/encoder/...": "xxxxxxxx-yyyyyyyy"}`` for every array leaf of ``tree`` (a train state or part)."""
    paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    keys = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in paths_leaves]
    sums = np.asarray(jax.device_get(_tree_checksums([leaf for _, leaf in paths_leaves])))
    return {k: f"{int(a):08x}-{int(b):08x}" for k, (a, b) in zip(keys, sums, strict=True)}


def checksum_record(tree: Any) -> dict[str, Any]:
    """What a trainer checkpoint stores beside its state (the ``checksums`` item, committed with the state)."""
    return {"algorithm": CHECKSUM_ALGORITHM, "arrays": tree_checksums(tree)}


def read_checksums(step_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The checksum record of a step, or None where none was written (a checkpoint from before checksums)."""
    item = Path(step_dir) / CHECKSUM_ITEM
    if not item.is_dir():
        return None
    try:
        return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(item)
    except Exception as e:  # any unreadable record is damage
        raise CheckpointDamagedError(
            f"checkpoint step {Path(step_dir).name}: its checksum record is unreadable ({_first_line(e)})"
        ) from e


def checksums_expected(step_dir: str | os.PathLike) -> bool:
    """Whether a step must have checksums: yes once an earlier step beside it has them. Steps older than every
    checksummed one were written before checksums existed; they are restored with a warning."""
    step_dir = Path(step_dir)
    if not step_dir.name.isdigit() or not step_dir.parent.is_dir():
        return True
    n = int(step_dir.name)
    return any(s < n for s in saved_steps(step_dir.parent, CHECKSUM_ITEM)) or (step_dir / CHECKSUM_ITEM).is_dir()


def verify_checksums(tree: Any, record: dict[str, Any] | None, step_dir: str | os.PathLike, trusted_without: bool) -> None:
    """Raises CheckpointDamagedError naming the step (and the first arrays) whose restored values differ.

    Only the leaves of ``tree`` are checked (a partial restore, e.g. parameters only, checks those).
    ``trusted_without``: accept a step without a record (a legacy model dir), logging a warning.
    """
    name = Path(step_dir).name
    if record is None:
        if trusted_without:
            logging.getLogger("dss_jax.checkpoints").warning(
                "checkpoint step %s has no checksums (written before they existed): not verified", name
            )
            return
        raise CheckpointDamagedError(f"checkpoint step {name} has no checksum record (incomplete or tampered with)")
    if record.get("algorithm") != CHECKSUM_ALGORITHM:
        raise CheckpointDamagedError(f"checkpoint step {name}: unknown checksum algorithm {record.get('algorithm')!r}")
    saved = record["arrays"]
    got = tree_checksums(tree)
    bad = [k for k, v in got.items() if saved.get(k) != v]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointDamagedError(
            f"checkpoint step {name} is damaged: {len(bad)} of {len(got)} arrays differ from their checksums "
            f"({', '.join(bad[:3])}{more})"
        )


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_file_digests(prefix: str | os.PathLike) -> None:
    """SHA-256 of every file named ``<prefix>_*`` (one process's data-iterator state), in ``<prefix>.sha256.json``.

    Written after the files and before the model checkpoint's save starts, so a committed step always has it."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in prefix.parent.glob(prefix.name + "_*") if p.is_file())
    record = {p.name: {"sha256": file_digest(p), "bytes": p.stat().st_size} for p in files}
    atomic_write(prefix.parent / (prefix.name + DATA_DIGEST_SUFFIX), json.dumps(record, indent=1) + "\n")


def verify_file_digests(prefix: str | os.PathLike, step: int, trusted_without: bool) -> None:
    """Raises CheckpointDamagedError when a data-iterator file of ``step`` is missing, truncated or altered."""
    prefix = Path(prefix)
    rec_file = prefix.parent / (prefix.name + DATA_DIGEST_SUFFIX)
    if not rec_file.exists():
        if trusted_without or not any(prefix.parent.glob(prefix.name + "_*")):
            return  # legacy checkpoint, or a data source that keeps no position
        raise CheckpointDamagedError(f"checkpoint step {step}: the data-iterator state has no digest file ({rec_file})")
    try:
        record = json.loads(rec_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointDamagedError(f"checkpoint step {step}: unreadable digest file {rec_file} ({e})") from e
    for name, want in record.items():
        p = prefix.parent / name
        if not p.exists():
            raise CheckpointDamagedError(f"checkpoint step {step}: data-iterator file {p} is missing")
        if p.stat().st_size != want["bytes"] or file_digest(p) != want["sha256"]:
            raise CheckpointDamagedError(f"checkpoint step {step}: data-iterator file {p} differs from its digest")


def _first_line(e: BaseException) -> str:
    """The first line of the innermost cause: Orbax wraps TensorStore's error (which names the damaged key) in a
    generic ``Exception`` whose own text is a bound-method repr."""
    while e.__cause__ is not None and e.__cause__ is not e:
        e = e.__cause__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def stored_tree(state_dir: Path) -> Any:
    """The metadata tree of a saved state. Orbax logs (absl WARNING) and returns None for metadata it cannot read
    (a damaged OCDBT manifest or b-tree node, a damaged ``_METADATA``) rather than raising: that is damage too."""
    _quiet_abandoned_reads()
    name = state_dir.parent.name
    try:
        meta = ocp.PyTreeCheckpointer().metadata(state_dir)
    except Exception as e:  # unreadable metadata is damage
        raise CheckpointDamagedError(f"checkpoint step {name} is damaged: metadata unreadable ({_first_line(e)})") from e
    item = meta.item_metadata if hasattr(meta, "item_metadata") else meta
    tree = getattr(item, "tree", None)
    if tree is None:
        raise CheckpointDamagedError(f"checkpoint step {name} is damaged: metadata unreadable (no array metadata in {state_dir})")
    return tree


def stored_leaf_shapes(state_dir: str | os.PathLike) -> list[tuple[int, ...]]:
    """Shapes of every array a saved state holds, from its metadata (CheckpointDamagedError if unreadable)."""
    tree = stored_tree(Path(state_dir))
    return [tuple(leaf.shape) for leaf in jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape"))]


# TensorStore's read errors: a status code and "Error reading ..." (a damaged chunk), or Orbax's wrappers of them.
_TENSORSTORE_ERROR = re.compile(r"^[A-Z_]+: Error (reading|opening)|^Encountered error while reading array|tensorstore_spec")


def _unretrieved_tensorstore_error(record: logging.LogRecord) -> bool:
    """False (drop) for asyncio's report of a collected read task, or of a gather of reads, whose TensorStore error
    nobody retrieved ("Task exception ...", "_GatheringFuture exception was never retrieved")."""
    exc = record.exc_info[1] if record.exc_info else None
    unretrieved = re.match(r"\w+ exception was never retrieved", record.getMessage()) is not None
    return not (unretrieved and exc is not None and _TENSORSTORE_ERROR.search(str(exc)))


def _quiet_abandoned_reads() -> None:
    """When one TensorStore read fails, Orbax stops waiting for the sibling reads in flight, and each of those later
    prints a traceback through sys.unraisablehook, after the damage was already reported: "RuntimeError: Event loop
    is closed" (TensorStore's callback into the closed loop), or "Exception ignored in: <coroutine ...
    _read_array_index_and_device_put>" (the abandoned read coroutine, finalized by the garbage collector, turns the
    GeneratorExit thrown into it into "Encountered error while reading array index ..." with a TensorStore spec).
    A sibling read task that failed too is logged by asyncio ("Task exception was never retrieved") when collected.
    Drop exactly those, so the damage is reported once, by name."""
    prev = sys.unraisablehook
    if getattr(prev, "dss_quiet", False):
        return
    logging.getLogger("asyncio").addFilter(_unretrieved_tensorstore_error)

    def hook(u: Any) -> None:
        exc = u.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        why = getattr(exc, "__cause__", None) or getattr(exc, "__context__", None)
        if inspect.iscoroutine(u.object) and isinstance(why, (GeneratorExit, asyncio.CancelledError)):
            return  # a coroutine closed unfinished, re-raising its GeneratorExit/cancellation as another error
        prev(u)

    hook.dss_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def read_or_damaged(fn: Any, step_dir: str | os.PathLike) -> Any:
    """Runs a restore; any error reading the files (TensorStore, truncated chunks) becomes CheckpointDamagedError."""
    _quiet_abandoned_reads()
    try:
        return fn()
    except CheckpointDamagedError:
        raise
    except Exception as e:  # the shapes were checked first, so what fails here is the files
        raise CheckpointDamagedError(f"checkpoint step {Path(step_dir).name} is damaged: unreadable ({_first_line(e)})") from e
