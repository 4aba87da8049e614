"""gin plumbing shared by the binaries: the repo's gin/ directory, --gin flags, and model presets by name."""

from __future__ import annotations

import collections.abc
import contextlib
import difflib
import logging
import os
import sys
import types
import typing
from collections.abc import Iterable, Iterator
from pathlib import Path

import gin

from dss_jax.model import ModelConfig

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
    readers = gin.config._FILE_READERS  # gin offers no public way to wrap a registered reader
    for i, (reader, exists) in enumerate(readers):
        if getattr(exists, "tolerant", False):
            continue

        def tolerant(path: str, _exists: collections.abc.Callable[[str], bool] = exists) -> bool:
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
        with _recording_origins():
            gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=finalize)
    except Exception as e:  # gin raises several types; the message names the file/line or binding
        print(f"error in gin config: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    unused = unused_macros([b.split("=", 1)[0].strip() for b in bindings if "=" in b])
    if unused:
        print(f"error in gin config: {unused}", file=sys.stderr)
        raise SystemExit(2)
    wrong = binding_type_errors()
    if wrong:
        print(f"error in gin config: {'; '.join(wrong)}", file=sys.stderr)
        raise SystemExit(2)


_UNKNOWN = object()


def _resolve_macros(value: object, config: dict, seen: tuple[str, ...] = ()) -> tuple[object, str | None]:
    """(the value with a macro reference followed to its bound value, the last macro followed or None);
    ``_UNKNOWN`` for other references (``@f()``: a call's result) and unbound macros."""
    macro = None
    while isinstance(value, gin.config.ConfigurableReference):
        if value.selector != "gin.macro":
            return _UNKNOWN, macro
        macro = value.config_key[0]
        if macro in seen or "value" not in config.get((macro, "gin.macro"), {}):
            return _UNKNOWN, macro
        seen = (*seen, macro)
        value = config[(macro, "gin.macro")]["value"]
    return value, macro


def _value_fits(value: object, hint: object) -> bool:
    """Whether a plain gin value fits a parameter's annotation. int, float, bool, str, None, Literal, callables and
    unions of them are checked; any other annotation (a class, a container) accepts everything."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_value_fits(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is collections.abc.Callable or origin is collections.abc.Callable:
        return callable(value)
    return True


def _is_plain(value: object) -> bool:
    return isinstance(value, (bool, int, float, str, type(None)))


def _type_name(hint: object) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if hint is collections.abc.Callable or typing.get_origin(hint) is collections.abc.Callable:
        return "a callable (a gin reference such as @module.fn())"
    return {float: "a number", int: "an integer", bool: "True or False", str: "a string"}.get(hint, str(hint))


def _parameter_hints(fn: object) -> dict[str, object]:
    """The resolved annotations of a configurable's parameters (a class: its ``__init__``'s); {} when they do not
    resolve."""
    target = fn.__init__ if isinstance(fn, type) else fn
    try:
        return typing.get_type_hints(target)
    except Exception:  # resolve them one by one: an annotation that does not resolve is not checked
        hints: dict[str, object] = {}
        scope = getattr(target, "__globals__", None)
        for name, ann in getattr(target, "__annotations__", {}).items():
            try:
                hints.update(typing.get_type_hints(type("_", (), {"__annotations__": {name: ann}}), globalns=scope))
            except Exception:
                continue
        return hints


def binding_type_errors() -> list[str]:
    """``name = value (where it was written): expected TYPE`` for each parsed binding whose value does not fit the
    annotation of the parameter it binds (``train.train.batch_size = 'x'``), so the job stops before it makes
    anything rather than with a traceback deep inside it. Macros are followed to their values; references to
    calls (``@f()``) are not checked."""
    config = gin.config._CONFIG  # gin lists no bindings publicly
    out = []
    for (scope, selector), params in list(config.items()):
        if selector == "gin.macro":
            continue
        configurable = gin.config._REGISTRY.get_match(selector)
        if configurable is None:
            continue
        hints = _parameter_hints(configurable.wrapped)
        for arg, raw in params.items():
            if arg not in hints:
                continue
            value, macro = _resolve_macros(raw, config)
            if value is _UNKNOWN or not _is_plain(value) or _value_fits(value, hints[arg]):
                continue
            name, origin, _ = _ORIGINS.get((scope, selector, arg), (f"{selector}.{arg}", "", None))
            if macro is not None:
                m_name, m_origin, _ = _ORIGINS.get((macro, "gin.macro", "value"), (f"macro {macro}", "", None))
                name, origin = f"{name} = %{macro}", f"{m_name}: {m_origin}" if m_origin else m_name
            out.append(f"{name} = {value!r}{f' ({origin})' if origin else ''}: expected {_type_name(hints[arg])}")
    return out


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


class UnreadBindingError(ValueError):
    """Gin bindings that the job never read: a misspelt name, or a setting for a part this run does not use."""


# Where each binding that parse_gin made was written: (scope, full selector, parameter) -> (name, where, file or
# None for a binding string). gin keeps the values only; an error about a binding should say where to find it.
_ORIGINS: dict[tuple[str, str, str], tuple[str, str, str | None]] = {}
# Macros the binaries read with query_macro (gin's operative config does not see gin.query_parameter).
_READ_BY_CODE: set[str] = set()


def _filename(location: object) -> str | None:
    return getattr(location, "filename", None) or None


def _describe(location: object) -> str:
    filename = _filename(location)
    if filename:
        return f"{filename}:{getattr(location, 'line_num', '?')}"
    line = str(getattr(location, "line_content", "") or "").strip()
    return f"on the command line: {line}" if line else "on the command line"


@contextlib.contextmanager
def _recording_origins() -> Iterator[None]:
    """Notes the file and line (or the binding string) of every binding gin makes while parsing."""
    parser_cls = gin.config_parser.ConfigParser
    parse_statement, bind_parameter = parser_cls.parse_statement, gin.config.bind_parameter
    where: list[object] = [None]

    def parse_statement_noting(self: object) -> object:
        statement = parse_statement(self)
        where[0] = getattr(statement, "location", None)
        return statement

    def bind_parameter_noting(binding_key: object, value: object) -> None:
        bind_parameter(binding_key, value)
        key = gin.config.ParsedBindingKey.parse(binding_key)  # validated by the call above
        if key.complete_selector == "gin.macro":
            name = f"macro {key.scope}"
        else:
            name = f"{key.scope + '/' if key.scope else ''}{key.given_selector}.{key.arg_name}"
        _ORIGINS[(key.scope, key.complete_selector, key.arg_name)] = (name, _describe(where[0]), _filename(where[0]))

    # gin 0.5 looks both up at call time: the parser's method on its class, bind_parameter as a module global
    parser_cls.parse_statement = parse_statement_noting
    gin.config.bind_parameter = bind_parameter_noting
    try:
        yield
    finally:
        parser_cls.parse_statement = parse_statement
        gin.config.bind_parameter = bind_parameter


def query_macro(name: str) -> object:
    """``gin.query_parameter('%NAME')``, noted as read for :func:`check_bindings_read`."""
    value = gin.query_parameter(f"%{name}")
    _READ_BY_CODE.add(name)
    return value


def _references(value: object, out: list[gin.config.ConfigurableReference]) -> None:
    if isinstance(value, gin.config.ConfigurableReference):
        out.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            _references(v, out)
    elif isinstance(value, (list, tuple, set)):
        for v in value:
            _references(v, out)


def _later_keys(config: dict, pending: Iterable[str]) -> set[tuple[str, str]]:
    """The config keys of the ``pending`` configurables (names such as ``optim.make_optimizer``) and of everything
    their bindings reference, transitively: the job calls them after the check."""
    names = tuple(pending)
    todo = [k for k in config if any(k[1] == n or k[1].endswith("." + n) for n in names)]
    seen: set[tuple[str, str]] = set()
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        seen.add(key)
        refs: list[gin.config.ConfigurableReference] = []
        _references(config.get(key, {}), refs)
        for ref in refs:
            scope, selector = ref.config_key
            todo.extend([(scope, selector)] if selector == "gin.macro" else [k for k in config if k[1] == selector])
    return seen


def unread_bindings(pending: Iterable[str] = (), exempt_files: Iterable[str | os.PathLike] = ()) -> list[str]:
    """``name (where it was written)`` for each binding made by :func:`parse_gin` that no call of a configurable has
    read so far (gin's operative config: the configurable was called, and without the caller passing that parameter).

    Bindings of the ``pending`` configurables and what they reference are taken as read (the job calls them later).
    Bindings written in the package's gin/ files and in ``exempt_files`` are not reported: those files hold settings
    shared by several binaries and methods (``INPUTS_PER_STEP`` documents the quickstart's step, for one).
    """
    config = gin.config._CONFIG  # gin lists neither the bindings nor the parameters its calls read
    operative = gin.config._OPERATIVE_CONFIG
    read: dict[tuple[str, str], list[tuple[str, ...]]] = {}
    for (scope, selector), params in list(operative.items()):
        for arg in params:
            read.setdefault((selector, arg), []).append(tuple(scope.split("/")) if scope else ())
    read_macros = sorted({s[-1] for (selector, _), scopes in read.items() if selector == "gin.macro" for s in scopes if s})
    later = _later_keys(config, pending)
    exempt = [GIN_DIR.resolve(), *(Path(f).resolve() for f in exempt_files)]
    out = []
    for (scope, selector, arg), (name, origin, file) in _ORIGINS.items():
        if arg not in config.get((scope, selector), {}) or (scope, selector) in later:
            continue  # cleared since, or read later
        if selector == "gin.macro" and scope in _READ_BY_CODE:
            continue
        if file and any(Path(file).resolve().is_relative_to(e) for e in exempt):
            continue
        parts = tuple(scope.split("/")) if scope else ()
        if not any(s[: len(parts)] == parts for s in read.get((selector, arg), [])):
            close = difflib.get_close_matches(scope, read_macros, n=1) if selector == "gin.macro" else []
            out.append(f"{name} ({origin}{'; did you mean ' + close[0] + '?' if close else ''})")
    return out


def check_bindings_read(job: str, pending: Iterable[str] = (), exempt_files: Iterable[str | os.PathLike] = ()) -> None:
    """Raises :class:`UnreadBindingError` naming the bindings :func:`unread_bindings` finds: an override that is
    never read (``--gin.registry.mixture_rate.a=0.3`` in a run that mixes by objective) would otherwise change
    nothing without a word."""
    unread = unread_bindings(pending, exempt_files)
    if unread:
        raise UnreadBindingError(
            f"gin binding{'s' if len(unread) > 1 else ''} that {job} never reads: {'; '.join(unread)}. "
            "Check the name, or remove the setting: this run does not use it"
        )


def error_text(e: BaseException) -> str:
    """An exception's message without the "In call to configurable ..." lines gin appends for each configurable it
    passed through: the binaries' errors stay one line."""
    return "\n".join(line for line in str(e).splitlines() if not line.startswith("  In call to configurable "))


def model_config(name: str, **overrides: object) -> ModelConfig:
    """The model config a ``gin/models/<name>.gin`` file describes (``model.T5Config`` or, for T5Gemma
    families, ``gemma.GemmaConfig`` bindings; the stacks of the latter are dicts of GemmaStack fields).

    Parses the file on its own (this clears and restores no other gin state: call it before, not after, a
    binary parses its own gin config).
    """
    path = model_gin_file(name)
    for p in _search_paths():
        gin.add_config_file_search_path(p)
    with gin.unlock_config():
        gin.clear_config()
        gin.parse_config_file(str(path))
        from dss_jax import gemma
        from dss_jax import model as model_lib

        found = {cls: _bindings_if_registered(cls) for cls in (model_lib.T5Config, gemma.GemmaConfig)}
        gin.clear_config()
    cls = gemma.GemmaConfig if found[gemma.GemmaConfig] and not found[model_lib.T5Config] else model_lib.T5Config
    return cls(**{**found[cls], **overrides})


def _bindings_if_registered(cls: type) -> dict:
    """gin's bindings of ``cls``; {} when the parsed files never name it (gin then has not registered it)."""
    try:
        return gin.get_bindings(cls)
    except ValueError:
        return {}


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
