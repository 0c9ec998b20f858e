"""Reading typed option dataclasses from command lines, YAML files and saved mappings, with jsonargparse.

jsonargparse owns the types and values: it converts and checks every value against its field's type (``Literal``
choices, ``Optional``, lists; numbers such as ``5e-2`` are floats, in files too), builds the dataclasses and writes
``--help`` from the docstring under each field. This module keeps what this project's command lines rely on and
jsonargparse does not do: a leaf name that is unique across sections may be used alone (``--epochs 3``), a
misspelled key is answered with the nearest valid ones, keys of earlier versions name what replaced them, flags take
no value (``--overwrite``; an option may give its own meaning to a bare flag, as ``--resume`` = latest), a list
option may be given one value at a time, ``--key-name`` is ``--key_name``, and every problem is one
:class:`ConfigError` naming the key and where it came from. ``ncl_hub.config`` applies it to the run configuration;
``recipes/evaluate.py`` and ``recipes/publish.py`` to their own options (:func:`parse_options`).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

from . import files
from .errors import UserError

__all__ = ["ConfigError", "DEBUG_HELP", "Layer", "cli_pairs", "data_layer", "describe", "error_line", "expects",
           "flatten", "leaves", "parse", "parse_options", "read_yaml", "resolve_key", "run_recipe"]

T = TypeVar("T")
Layer = Tuple[str, Dict[str, Any]]  # (source, {dotted path: value, or command-line text})
_NO_RENAMES: Mapping[str, str] = {}


class ConfigError(UserError, ValueError):
    """A configuration problem, reported before any training starts."""


# ---------------------------------------------------------------------------------------------- keys
@functools.lru_cache(maxsize=None)
def leaves(cls: type) -> Dict[str, Any]:
    """Every leaf of a (nested) options dataclass: dotted path -> type."""
    out: Dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update({f"{f.name}.{k}": v for k, v in leaves(hints[f.name]).items()})
        else:
            out[f.name] = hints[f.name]
    return out


def resolve_key(key: str, known: Dict[str, Any], *, shortcuts: bool = True,
                 renamed: Mapping[str, str] = _NO_RENAMES) -> str:
    """The dotted path ``key`` names: itself, or the one leaf that ends in it; else a ConfigError that names the
    replacement of an old key, the candidates of an ambiguous one, or the nearest valid keys."""
    key = key.replace("-", "_")
    if key in renamed:
        raise ConfigError(f"config key {key!r} was replaced by {renamed[key]}")
    if key in known:
        return key
    matches = [p for p in known if p.split(".")[-1] == key] if shortcuts else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"config key {key!r} is ambiguous: write one of {matches}")
    names = list(known) + ([p.split(".")[-1] for p in known] if shortcuts else [])
    close = difflib.get_close_matches(key, list(dict.fromkeys(names)), n=4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown config key {key!r}.{hint} Run with --help to list every key.")


def flatten(data: Dict[str, Any], sections: set, prefix: str = "") -> Dict[str, Any]:
    """Nested mappings of options as one mapping of dotted keys (``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``);
    only the mappings named in ``sections`` are opened (a dict-valued option stays one value)."""
    out: Dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path in sections:
            out.update(flatten(value, sections, path + "."))
        else:
            out[path] = value
    return out


def _nest(flat: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _is_bool(tp: Any) -> bool:
    return tp is bool or (typing.get_origin(tp) is Union and set(typing.get_args(tp)) == {bool, type(None)})


def _is_list(tp: Any) -> bool:
    inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is Union else [tp]
    return any(typing.get_origin(a) is list for a in inner)


def _cli_pairs(argv: Sequence[str], known: Dict[str, Any], *, positional: Sequence[str] = (),
               bare: Mapping[str, str] = _NO_RENAMES, renamed: Mapping[str, str] = _NO_RENAMES) -> Dict[str, Any]:
    """``--key value`` / ``--key=value`` / bare flags -> {dotted path: text}; ``config`` is kept as it is. A list
    option given several times (or one value at a time) collects its values. Leading bare arguments fill
    ``positional`` in order (a list positional takes every bare argument up to the first option). ``bare``: what
    an option given without a value means (bools: true)."""
    pairs: Dict[str, Any] = {}
    argv, i = list(argv), 0
    for name in positional:
        while i < len(argv) and not argv[i].startswith("--"):
            if not _is_list(known.get(name)):
                pairs[name], i = argv[i], i + 1
                break
            pairs[name], i = [*pairs.get(name, []), argv[i]], i + 1
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are --key value (see --help)")
        key, eq, value = arg[2:].partition("=")
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        path = key if key == "config" else resolve_key(key, known, renamed=renamed)
        if eq:
            i += 1
        elif (nxt is None or nxt.startswith("--")) and (path in bare or _is_bool(known.get(path))):
            value, i = bare.get(path, "true"), i + 1
        elif nxt is None:
            raise ConfigError(f"option --{key} needs a value")
        else:
            value, i = nxt, i + 2
        if path in known and _is_list(known[path]) and not value.lstrip().startswith("["):
            pairs[path] = [*pairs[path], value] if isinstance(pairs.get(path), list) else [value]
        else:
            pairs[path] = value
    return pairs


def data_layer(cls: type, data: Dict[str, Any], source: str,
               renamed: Mapping[str, str] = _NO_RENAMES, retired: Sequence[str] = ()) -> Layer:
    """A mapping of values (a YAML file, a saved config; sections as nested mappings) with every key checked;
    ``retired`` keys (settings that no longer exist, in files written by an earlier version) are left out."""
    known = leaves(cls)
    sections = {path.split(".")[0] for path in known if "." in path}
    try:
        return source, {resolve_key(k, known, shortcuts=False, renamed=renamed): v
                        for k, v in flatten(data, sections).items() if k not in retired}
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def read_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    """A YAML file of values; a missing, damaged or foreign one is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        return files.read_yaml(path, fix="Fix or replace it.")
    except files.DamagedFileError as e:  # a damaged or foreign file: name it, not a traceback
        raise ConfigError(f"config file {e}") from None


# ---------------------------------------------------------------------------------------------- parsing
@functools.lru_cache(maxsize=None)
def _parser(cls: type, description: str = "", config_file: bool = False):
    import argparse

    from jsonargparse import ArgumentParser, DefaultHelpFormatter, set_parsing_settings

    class Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):  # keeps the recipe's examples
        pass

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # each field's help is the docstring under it
    parser = ArgumentParser(prog=Path(sys.argv[0]).name, description=description, exit_on_error=False,
                            allow_abbrev=False, formatter_class=Formatter)
    if config_file:
        parser.add_argument("--config", type=Optional[str], help="YAML file of values (sections as mappings)")
    parser.add_class_arguments(cls, nested_key=None, fail_untyped=True)
    defaults = parser.get_defaults()
    missing = [path for path in leaves(cls) if path not in defaults]
    if missing:  # jsonargparse skips a class it cannot inspect (e.g. its module is not in sys.modules)
        raise TypeError(f"jsonargparse made no option of {sorted(missing)} of {cls.__qualname__}")
    return parser


def describe(cls: type, description: str = "", config_file: bool = False) -> str:
    """The --help text: every option with its type, default and help."""
    return _parser(cls, description, config_file).format_help()


def expects(key: str, tp: Any, value: Any) -> str:
    """The message for a value of ``key`` that is not of its type ``tp`` (or not one of its choices)."""
    choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else ()
    if choices:
        names = [str(c) for c in choices]
        return f"{key} must be {', '.join(names[:-1])} or {names[-1]}, got {value!r}"
    inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is Union else [tp]
    name = " or ".join(getattr(a, "__name__", None) or str(a).replace("typing.", "") for a in inner)
    return f"config key {key!r} expects {name}, got {value!r}"


def _cli_text(value: Any, tp: Any) -> str:
    if isinstance(value, list):  # collected one value at a time
        return "[" + ", ".join(value) + "]"
    optional = typing.get_origin(tp) is Union and type(None) in typing.get_args(tp)
    return "null" if optional and value.strip() in ("none", "None", "~") else value


def parse(cls: Type[T], layers: Sequence[Layer], base: Optional[T] = None) -> T:
    """Merge ``layers`` over ``base`` (default: the defaults) with jsonargparse and build the dataclass. A layer's
    source is ``"command line"`` (values are command-line text) or names a file or mapping (values are data). A bad
    value is a ConfigError naming its source and key."""
    from jsonargparse import ArgumentError

    parser, known = _parser(cls), leaves(cls)
    ns = parser.get_defaults() if base is None else parser.parse_object(dataclasses.asdict(base))
    for source, values in layers:
        values = {k: v for k, v in values.items() if k != "config"}
        try:
            if source == "command line":
                args = [a for k, v in values.items() for a in (f"--{k}", _cli_text(v, known[k]))]
                ns = parser.parse_args(args, namespace=ns)
            else:
                ns = parser.parse_object(_nest(values), namespace=ns)
        except ArgumentError as e:
            match = re.search(r'Parser key "([^"]+)"', str(e))
            key = match.group(1) if match else None
            if key in known:
                raise ConfigError(f"{source}: {expects(key, known[key], values.get(key))}") from None
            raise ConfigError(f"{source}: {str(e).strip()}") from None
    try:
        built = parser.instantiate(ns)
        return cls(**{f.name: built[f.name] for f in dataclasses.fields(cls)})
    except (TypeError, ValueError) as e:  # a dataclass's own check (MocoConfig)
        raise ConfigError(str(e)) from None


def parse_options(cls: Type[T], argv: Sequence[str], *, positional: Sequence[str] = (), description: str = "",
                  overrides_of: Optional[type] = None) -> Tuple[T, Dict[str, Any]]:
    """A recipe's own options (a dataclass) from ``argv``, read like the training options.

    Returns ``(options, overrides)``: with ``overrides_of`` (e.g. RunConfig), keys that are not options of ``cls``
    but keys of ``overrides_of`` are returned as ``{dotted path: text}`` (for ``config.apply_overrides``).
    """
    if "-h" in argv or "--help" in argv:
        print(describe(cls, description))
        raise SystemExit(0)
    own = leaves(cls)
    pairs = _cli_pairs(argv, {**(leaves(overrides_of) if overrides_of else {}), **own}, positional=positional)
    missing = [name.upper() for name in positional if name not in pairs]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)} (see --help)")
    options = parse(cls, [("command line", {k: v for k, v in pairs.items() if k in own})])
    return options, {k: v for k, v in pairs.items() if k not in own}


def cli_pairs(argv: Sequence[str], cls: type, *, bare: Mapping[str, str] = _NO_RENAMES,
              renamed: Mapping[str, str] = _NO_RENAMES) -> Dict[str, Any]:
    """The ``--key value`` pairs of ``argv`` for the options of ``cls``, keys resolved (see module docstring)."""
    return _cli_pairs(argv, leaves(cls), bare=bare, renamed=renamed)


# ---------------------------------------------------------------------------------------------- running a recipe
DEBUG_ENV = "NCL_HUB_DEBUG"
DEBUG_HELP = (f"An error that ends the command is one line, 'error: <what went wrong>. <what to do>'; --debug (or "
              f"{DEBUG_ENV}=1) shows its full traceback instead.")


def error_line(error: BaseException) -> str:
    """``error: <message>`` on one line. A :class:`~ncl_hub.errors.UserError` (bad input, a diverging run) is its
    message; any other exception is a bug or a case ncl_hub does not handle, and says how to see more."""
    text = str(error).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the worker's own last line
        text = next((line for line in reversed(text.splitlines()) if line.strip()), text)
    text = " ".join(text.split())
    if isinstance(error, UserError):
        return f"error: {text}"
    return (f"error: {type(error).__name__}: {text or 'no message'}. This is unexpected: rerun with --debug to see "
            "where it happened, and report it if it is a bug")


def run_recipe(run: Callable[[List[str]], T], argv: Optional[Sequence[str]] = None) -> T:
    """Run a recipe's ``run(args)`` on its command line (``sys.argv[1:]`` when ``argv`` is None).

    From the command line, an error that ends it is printed as :func:`error_line` (the last line of stderr, no
    traceback) and the process exits with status 1; ``--debug`` (removed from the arguments) or
    ``NCL_HUB_DEBUG=1`` lets the traceback through. In-process callers (``argv`` given, e.g. tests) get the
    exception itself."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    args = [a for a in args if a != "--debug"]
    if argv is not None or debug:
        return run(args)
    try:
        return run(args)
    except Exception as e:  # the one place every recipe's errors end: one line, not a traceback
        print(error_line(e), file=sys.stderr)
        raise SystemExit(1) from None
