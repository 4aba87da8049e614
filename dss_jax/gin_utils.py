"""Gin plumbing for the binaries: the search path, ``--gin`` flags, parsing with one-line errors that name the binding
and where it was written, type checks of bound values, and the check that every binding was read.

Everything goes through gin's public API (``gin.config_parser`` to learn where each binding was written,
``gin.query_parameter`` for values, ``gin.operative_config_str`` for what the job's calls read) except one reader
wrapper: see :func:`_tolerate_namespace_packages`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import logging
import os
import sys
import types
import typing
from collections.abc import Iterable, Iterator
from pathlib import Path

import gin
import gin.resource_reader
from gin import config_parser

# The repo's gin/ (source checkouts, editable installs), else the copy installed as dss_jax/gin_configs.
_REPO_GIN = Path(__file__).resolve().parent.parent / "gin"
GIN_DIR = _REPO_GIN if (_REPO_GIN / "models").is_dir() else Path(__file__).resolve().parent / "gin_configs"

MACRO = "gin.macro"


def search_paths() -> list[str]:
    """gin/ of the package, then the folders in ``DSS_GIN_SEARCH_PATHS`` (os.pathsep-separated)."""
    extra = [p for p in os.environ.get("DSS_GIN_SEARCH_PATHS", "").split(os.pathsep) if p]
    return [str(GIN_DIR), *extra]


def add_search_paths() -> None:
    for p in search_paths():
        gin.add_config_file_search_path(p)


def split_gin_args(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Pulls ``--gin_file=F``, ``--gin.NAME=VALUE`` (T5X's flag style) and ``--gin_bindings=B`` out of argv.

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


_QUIET_INCLUDES = _QuietGinIncludes()


def _tolerate_namespace_packages() -> None:
    """The one use of a private gin internal, ``gin.config._FILE_READERS``, and why it is unavoidable.

    ``gin.resource_reader`` registers (at import) a reader whose existence check raises TypeError on an include
    such as ``models/x.gin`` when a folder ``models/`` in the working directory imports as a namespace package
    (``python -m`` from that directory). gin tries the working directory first and every registered reader there,
    so the TypeError ends the parse before the search path is tried. gin's public ``register_file_reader`` only
    appends readers; nothing public can wrap or reorder one. The wrapper answers "not there" for that TypeError.
    tests/test_gin_utils.py fails when gin changes the list this relies on."""
    readers = gin.config._FILE_READERS  # see the docstring
    for i, (reader, exists) in enumerate(readers):
        if getattr(exists, "tolerant", False):
            continue

        def tolerant(path: str, _exists: typing.Callable[[str], bool] = exists) -> bool:
            try:
                return _exists(path)
            except TypeError:
                return False

        tolerant.tolerant = True  # type: ignore[attr-defined]
        readers[i] = (reader, tolerant)


def _resolve_files(files: list[str]) -> list[str]:
    """Each file as given when it exists, else its first match on the search path; SystemExit naming a miss."""
    resolved = []
    for f in files:
        found = [c for c in (f, *(os.path.join(p, f) for p in search_paths())) if os.path.exists(c)]
        if not found:
            raise SystemExit(f"gin file {f!r} not found (looked in . and {', '.join(search_paths())})")
        resolved.append(found[0])
    return resolved


def parse_gin(files: list[str], bindings: list[str], finalize: bool = True) -> None:
    """Parses gin files (looked up in the working dir, then gin/) and bindings, then checks the bound values'
    types; an error is one line on stderr naming the file and line or the binding, and SystemExit(2)."""
    logging.getLogger().addFilter(_QUIET_INCLUDES)
    _tolerate_namespace_packages()
    add_search_paths()
    resolved = _resolve_files(files)
    try:
        gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=False)
        _BINDINGS.clear()
        _BINDINGS.update(_written_bindings(resolved, bindings))
        wrong = binding_type_errors()
        if wrong:
            raise ValueError("; ".join(wrong))
        if finalize:
            gin.finalize()
    except Exception as e:  # gin raises several types; the message names the file/line or binding
        print(f"error in gin config: {e}", file=sys.stderr)
        raise SystemExit(2) from e


# ----------------------------------------------------------------------------- where each binding was written


@dataclasses.dataclass(frozen=True)
class Binding:
    """One binding parse_gin made: its config key, its name as written, and where (file:line or the command line)."""

    scope: str
    selector: str  # gin's complete selector ("gin.macro" for a macro, whose name is then the scope)
    arg: str
    name: str
    where: str
    file: str | None

    @property
    def key(self) -> str:
        """The binding key ``gin.query_parameter`` takes."""
        return f"{self.scope + '/' if self.scope else ''}{self.selector}.{self.arg}"


# The bindings of the last parse_gin, by (scope, complete selector, parameter); the last writer wins, as in gin.
_BINDINGS: dict[tuple[str, str, str], Binding] = {}


def written_bindings() -> list[Binding]:
    """The bindings the last :func:`parse_gin` made, each with where it was written."""
    return list(_BINDINGS.values())


class _Placeholders(config_parser.ParserDelegate):
    """Values are not needed to learn where a binding was written (gin's own parse made them)."""

    def configurable_reference(self, scoped_selector: str, evaluate: bool) -> None:
        return None

    def macro(self, macro_name: str) -> None:
        return None


def _statements(text: str | typing.TextIO, seen: tuple[str, ...] = ()) -> Iterator[config_parser.BindingStatement]:
    """The binding statements of a gin file or string, following includes the way gin finds them."""
    for statement in config_parser.ConfigParser(text, _Placeholders()):
        if isinstance(statement, config_parser.BindingStatement):
            yield statement
        elif isinstance(statement, config_parser.IncludeStatement):
            path = _find_include(statement.filename)
            if path is not None and path not in seen:
                with open(path) as f:
                    yield from _statements(f, (*seen, path))


def _find_include(name: str) -> str | None:
    prefixes = [""] if os.path.isabs(name) else ["", *search_paths()]
    return next((os.path.join(p, name) for p in prefixes if os.path.isfile(os.path.join(p, name))), None)


def _complete(scope: str, selector: str, arg: str) -> tuple[str, str, str]:
    """(scope, gin's complete selector, parameter) of a binding as written; a macro ``NAME = v`` is
    (NAME, gin.macro, value), as gin keys it."""
    if not arg:
        return (f"{scope}/{selector}" if scope else selector), MACRO, "value"
    try:
        key = gin.config.ParsedBindingKey.parse((scope, selector, arg))
    except (ValueError, RuntimeError):
        return scope, selector, arg
    return key.scope, key.complete_selector, key.arg_name


def _written_bindings(files: list[str], bindings: list[str]) -> dict[tuple[str, str, str], Binding]:
    out: dict[tuple[str, str, str], Binding] = {}
    for f in files:
        with open(f) as text:
            _note(out, _statements(text, (f,)))
    _note(out, _statements("\n".join(bindings)))
    return out


def _note(out: dict[tuple[str, str, str], Binding], statements: Iterable[config_parser.BindingStatement]) -> None:
    for st in statements:
        scope, selector, arg = _complete(st.scope, st.selector, st.arg_name)
        name = f"macro {scope}" if selector == MACRO else f"{st.scope + '/' if st.scope else ''}{st.selector}.{st.arg_name}"
        out[(scope, selector, arg)] = Binding(scope, selector, arg, name, _describe(st.location), st.location.filename or None)


def _describe(location: config_parser.Location) -> str:
    if location.filename:
        return f"{location.filename}:{location.line_num}"
    line = (location.line_content or "").strip()
    return f"on the command line: {line}" if line else "on the command line"


def _current(binding: Binding) -> object:
    """The value bound now; ``_UNKNOWN`` when it has been cleared since parse_gin."""
    try:
        return gin.query_parameter(binding.key)
    except ValueError:
        return _UNKNOWN


# ----------------------------------------------------------------------------- type checks of bound values

_UNKNOWN = object()


def _macro_value(name: str) -> object:
    try:
        return gin.query_parameter(f"{name}/{MACRO}.value")
    except ValueError:
        return _UNKNOWN


def _resolve_macros(value: object) -> tuple[object, str | None]:
    """(the value with a macro reference followed to its bound value, the last macro followed or None);
    ``_UNKNOWN`` for other references (``@f()``: a call's result) and unbound macros."""
    macro, seen = None, set()
    while isinstance(value, gin.config.ConfigurableReference):
        if value.config_key[1] != MACRO:
            return _UNKNOWN, macro
        macro = value.config_key[0]
        if macro in seen:
            return _UNKNOWN, macro
        seen.add(macro)
        value = _macro_value(macro)
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


def _type_name(hint: object) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if hint is collections.abc.Callable or origin is collections.abc.Callable:
        return "a callable (a gin reference such as @module.fn())"
    names: dict[object, str] = {float: "a number", int: "an integer", bool: "True or False", str: "a string"}
    return names.get(hint, str(hint))


def _parameter_hints(selector: str) -> dict[str, object]:
    """The resolved annotations of a configurable's parameters (a class: its ``__init__``'s); {} when they do not
    resolve."""
    try:
        fn = gin.get_configurable(selector)
    except (ValueError, KeyError):
        return {}
    target = inspect.unwrap(typing.cast(typing.Any, fn).__init__ if isinstance(fn, type) else fn)
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
    """``name = value (where it was written): expected TYPE`` for each binding of the last :func:`parse_gin` whose
    value does not fit the annotation of the parameter it binds (``train.train.batch_size = 'x'``), so the job stops
    before it makes anything rather than with a traceback deep inside it. Macros are followed to their values;
    references to calls (``@f()``) are not checked."""
    out = []
    for b in list(_BINDINGS.values()):
        if b.selector == MACRO:
            continue
        hint = _parameter_hints(b.selector).get(b.arg)
        if hint is None:
            continue
        value, macro = _resolve_macros(_current(b))
        if value is _UNKNOWN or not isinstance(value, (bool, int, float, str, type(None))) or _value_fits(value, hint):
            continue
        name, origin = b.name, b.where
        if macro is not None:
            m = _BINDINGS.get((macro, MACRO, "value"))
            name, origin = f"{name} = %{macro}", (f"{m.name}: {m.where}" if m else f"macro {macro}")
        out.append(f"{name} = {value!r} ({origin}): expected {_type_name(hint)}")
    return out


# ----------------------------------------------------------------------------- every binding is read


class UnreadBindingError(ValueError):
    """Gin bindings that the job never read: a misspelt name, or a setting for a part this run does not use."""


# Macros the binaries read with query_macro (gin's operative config does not see gin.query_parameter).
_READ_BY_CODE: set[str] = set()


def query_macro(name: str) -> object:
    """``gin.query_parameter('%NAME')``, noted as read for :func:`check_bindings_read`."""
    value = gin.query_parameter(f"%{name}")
    _READ_BY_CODE.add(name)
    return value


def _read_parameters() -> dict[tuple[str, str], list[tuple[str, ...]]]:
    """(complete selector, parameter) -> the scopes it was read in, from gin's operative config: the parameters of
    every configurable called so far (gin writes it as gin text, so its own parser reads it back)."""
    read: dict[tuple[str, str], list[tuple[str, ...]]] = {}
    for st in _statements(gin.operative_config_str()):
        scope, selector, arg = _complete(st.scope, st.selector, st.arg_name)
        parts = (scope,) if selector == MACRO else tuple(scope.split("/")) if scope else ()
        read.setdefault((selector, arg), []).append(parts)
    return read


def _referenced(bindings: Iterable[Binding]) -> Iterator[gin.config.ConfigurableReference]:
    """The references (``@f``, ``@f()``, ``%MACRO``) in the current values of ``bindings``, however nested."""
    for b in bindings:
        value = _current(b)
        if value is not _UNKNOWN:
            yield from gin.config.iterate_references(value)


def _later(pending: Iterable[str]) -> set[tuple[str, str]]:
    """The config keys of the ``pending`` configurables (names such as ``optim.make_optimizer``) and of everything
    their bindings reference, transitively: the job calls them after the check."""
    names = tuple(pending)
    keys = {(b.scope, b.selector) for b in _BINDINGS.values()}
    todo = [k for k in keys if any(k[1] == n or k[1].endswith("." + n) for n in names)]
    seen: set[tuple[str, str]] = set()
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        seen.add(key)
        for ref in _referenced(b for b in _BINDINGS.values() if (b.scope, b.selector) == key):
            scope, selector = ref.config_key
            todo.extend([(scope, selector)] if selector == MACRO else [k for k in keys if k[1] == selector])
    return seen


def unread_bindings(pending: Iterable[str] = (), exempt_files: Iterable[str | os.PathLike] = ()) -> list[str]:
    """``name (where it was written)`` for each binding of the last :func:`parse_gin` that no call of a configurable
    has read so far (gin's operative config: the configurable was called, and without the caller passing that
    parameter); a macro's suggests the closest macro that is referenced.

    Bindings of the ``pending`` configurables and what they reference are taken as read (the job calls them later).
    Bindings written in the package's gin/ files and in ``exempt_files`` are not reported: those files hold settings
    shared by several binaries and methods (``INPUTS_PER_STEP`` documents the quickstart's step, for one).
    """
    read = _read_parameters()
    macros = sorted({r.config_key[0] for r in _referenced(_BINDINGS.values()) if r.config_key[1] == MACRO})
    later = _later(pending)
    exempt = [GIN_DIR.resolve(), *(Path(f).resolve() for f in exempt_files)]
    out = []
    for b in _BINDINGS.values():
        if (b.scope, b.selector) in later or (b.selector == MACRO and b.scope in _READ_BY_CODE):
            continue
        if (b.file and any(Path(b.file).resolve().is_relative_to(e) for e in exempt)) or _current(b) is _UNKNOWN:
            continue  # a shared file, or cleared since
        parts = (b.scope,) if b.selector == MACRO else tuple(b.scope.split("/")) if b.scope else ()
        if not any(s[: len(parts)] == parts for s in read.get((b.selector, b.arg), [])):
            close = difflib.get_close_matches(b.scope, [m for m in macros if m != b.scope], n=1)
            hint = f"; did you mean {close[0]}?" if b.selector == MACRO and close else ""
            out.append(f"{b.name} ({b.where}{hint})")
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
