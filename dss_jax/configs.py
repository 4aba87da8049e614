"""gin plumbing shared by the binaries: the repo's gin/ directory, --gin flags, and model presets by name."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import gin

from dss_jax.model import T5Config

# The repo's gin/ (source checkouts, editable installs), else the copy installed as dss_jax/gin_configs.
_REPO_GIN = Path(__file__).resolve().parent.parent / "gin"
GIN_DIR = _REPO_GIN if (_REPO_GIN / "models").is_dir() else Path(__file__).resolve().parent / "gin_configs"


def _search_paths() -> list[str]:
    extra = [p for p in os.environ.get("DSS_GIN_SEARCH_PATHS", "").split(os.pathsep) if p]
    return [str(GIN_DIR), *extra]


def model_names() -> list[str]:
    return sorted(p.stem for p in (GIN_DIR / "models").glob("*.gin"))


def model_gin_file(name: str) -> Path:
    """``gin/models/<name>.gin``; an unknown name fails listing the sizes that exist."""
    path = GIN_DIR / "models" / f"{name}.gin"
    if not path.exists():
        raise ValueError(f"unknown model size {name!r}; known sizes (gin/models/*.gin): {', '.join(model_names())}")
    return path


def split_gin_args(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Pulls ``--gin_file=F`` and ``--gin.NAME=VALUE`` (T5X's flag style) out of argv.

    Returns (gin files, gin bindings, the remaining argv).
    """
    files, bindings, rest = [], [], []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--gin_file"):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            if value is None:
                raise SystemExit("--gin_file needs a value")
            files.append(value)
        elif arg.startswith("--gin."):
            body = arg[len("--gin.") :]
            if "=" not in body:
                raise SystemExit(f"{arg}: expected --gin.NAME=VALUE")
            name, value = body.split("=", 1)
            bindings.append(f"{name} = {value}")
        elif arg == "--gin_bindings" or arg.startswith("--gin_bindings="):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            if value is None:
                raise SystemExit("--gin_bindings needs a value")
            bindings.append(value)
        else:
            rest.append(arg)
    return files, bindings, rest


class _QuietGinIncludes(logging.Filter):
    """gin logs 'Path not found' at ERROR for every search path an include is *not* in; only the last
    failure matters, and gin raises for that itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Path not found:")


def _tolerant_gin_file_checks() -> None:
    """gin's package-path reader raises TypeError on an include like 'runs/x.gin' when a folder ``runs/`` in the
    working dir imports as a namespace package (python -m from the repo root, next to runs/quickstart/): treat
    that as "not there" so the search path finds the file."""
    readers = gin.config._FILE_READERS  # noqa: SLF001 - gin offers no public way to wrap a registered reader
    for i, (reader, exists) in enumerate(readers):
        if getattr(exists, "tolerant", False):
            continue

        def tolerant(path: str, _exists=exists) -> bool:  # noqa: ANN001
            try:
                return _exists(path)
            except TypeError:
                return False

        tolerant.tolerant = True
        readers[i] = (reader, tolerant)


def parse_gin(files: list[str], bindings: list[str], finalize: bool = True) -> None:
    """Parses gin files (looked up in the working dir, then gin/) and bindings, with errors naming them."""
    logging.getLogger().addFilter(_QuietGinIncludes())
    _tolerant_gin_file_checks()
    for p in _search_paths():
        gin.add_config_file_search_path(p)
    resolved = []
    for f in files:
        if os.path.exists(f):
            resolved.append(f)
            continue
        for p in _search_paths():
            if os.path.exists(os.path.join(p, f)):
                resolved.append(os.path.join(p, f))
                break
        else:
            raise SystemExit(f"gin file {f!r} not found (looked in . and {', '.join(_search_paths())})")
    try:
        gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=finalize)
    except Exception as e:  # gin raises several types; the message names the file/line or binding
        print(f"error in gin config: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    unused = unused_macros([b.split("=", 1)[0].strip() for b in bindings if "=" in b])
    if unused:
        print(f"error in gin config: {unused}", file=sys.stderr)
        raise SystemExit(2)


def _macro_references(value: object, out: set[str]) -> None:
    if isinstance(value, gin.config.ConfigurableReference) and value.selector == "gin.macro":
        out.add(value.config_key[0])
    elif isinstance(value, dict):
        for v in value.values():
            _macro_references(v, out)
    elif isinstance(value, (list, tuple, set)):
        for v in value:
            _macro_references(v, out)


def unused_macros(bound_names: list[str]) -> str | None:
    """A message naming the macros in ``bound_names`` (command-line bindings) that no binding reads, with the
    closest macro that is read: ``--gin.SEEED=1`` would otherwise be ignored silently."""
    import difflib

    config = gin.config._CONFIG  # gin has no public listing of bound macros and their references
    defined = {scope for scope, selector in config if selector == "gin.macro"}
    used: set[str] = set()
    for params in config.values():
        _macro_references(params, used)
    bad = [n for n in bound_names if "." not in n and "/" not in n and n in defined and n not in used]
    if not bad:
        return None
    hints = []
    for n in bad:
        close = difflib.get_close_matches(n, sorted(used), n=1)
        hints.append(f"{n}" + (f" (did you mean {close[0]}?)" if close else ""))
    return "macro " + ", ".join(hints) + " is bound but nothing in the config reads it"


def model_config(name: str, **overrides: object) -> T5Config:
    """The T5Config a ``gin/models/<name>.gin`` file describes.

    Parses the file on its own (this clears and restores no other gin state: call it before, not after, a
    binary parses its own gin config).
    """
    path = model_gin_file(name)
    for p in _search_paths():
        gin.add_config_file_search_path(p)
    with gin.unlock_config():
        gin.clear_config()
        gin.parse_config_file(str(path))
        from dss_jax import model as model_lib

        bindings = gin.get_bindings(model_lib.T5Config)
        gin.clear_config()
    return T5Config(**{**bindings, **overrides})


def quiet_data_layer_imports() -> None:
    """Imports TensorFlow and friends with fd 2 closed: their C++ start-up lines (CUDA probes on a CPU machine,
    absl's pre-init warning) bypass Python logging and TF_CPP_MIN_LOG_LEVEL. Errors still raise."""
    import importlib

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        for name in ("tensorflow", "tensorflow_text", "tensorflow_datasets", "seqio"):
            try:
                importlib.import_module(name)
            except ImportError:
                pass  # the data layer's own import reports it where it is needed
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")  # the input pipeline runs on the host; accelerators are JAX's
    except ImportError:
        pass
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def setup_logging() -> None:
    """INFO from dss_jax to stderr (absl may already own the root logger); quieter third-party loggers."""
    lg = logging.getLogger("dss_jax")
    if not lg.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        lg.addHandler(handler)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    for noisy in ("absl", "orbax", "jax._src", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
