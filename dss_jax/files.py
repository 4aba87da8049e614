"""File helpers shared by the trainer, the data layer and dss-teacher: atomic writes and the steps of a checkpoints
directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    """The process umask (read from /proc where it can be: setting it to read it races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Temp file in the same directory, fsync, then os.replace: readers, and a run interrupted mid-write, see the
    old file or the new one, never half of one. Text is written as UTF-8.

    The file gets the mode ``open()`` would give it (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def saved_steps(ckpts: str | os.PathLike, item: str = "state") -> list[int]:
    """The steps of a checkpoints directory (``<ckpts>/<step>/<item>``; a trainer checkpoint's item is its state),
    in increasing order; [] when ``ckpts`` is not a directory."""
    ckpts = Path(ckpts)
    if not ckpts.is_dir():
        return []
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit() and (p / item).is_dir())
