"""Command-line options generated from settings dataclasses, so defaults are written once.

Each field's ``metadata`` (see :func:`nst.engine.settings.option`) may hold ``help``,
``choices``, ``flag``, ``positional``, ``nargs``, ``parse``, ``aliases``, ``action``
(``"append"``), ``required``, ``metavar``, ``cli`` (False: not an option), ``nested``
(a settings object whose own fields become options, flat), ``omit`` (a metadata key,
such as ``"loop_only"``, whose fields a nested settings object does not offer here) and
``require`` (names of a nested object's fields that are required here).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def _base_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    return tp


def _default(f: dataclasses.Field) -> tuple[bool, Any]:
    if f.default is not dataclasses.MISSING:
        return True, f.default
    if f.default_factory is not dataclasses.MISSING:
        return True, f.default_factory()
    return False, None


def _fields(cls: type, omit: str | None = None, require=()):
    """(field, base type, required here) of ``cls``, nested settings expanded in place."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("cli", True) is False or (omit and meta.get(omit)):
            continue
        if meta.get("nested"):
            yield from _fields(_base_type(hints[f.name]), meta.get("omit"), meta.get("require", ()))
        else:
            yield f, _base_type(hints[f.name]), f.name in require


def _kwargs(f: dataclasses.Field, tp: Any, required: bool = False) -> dict[str, Any]:
    """argparse keyword arguments for one field."""
    meta = f.metadata
    has_default, default = _default(f)
    kwargs: dict[str, Any] = {"help": meta.get("help", "")}
    if "choices" in meta:
        kwargs["choices"] = meta["choices"]
    if meta.get("action") == "append":
        kwargs.update(action="append", type=meta.get("parse", str), default=None)
    elif tp is bool:
        kwargs.update(action=argparse.BooleanOptionalAction, default=default)
    elif typing.get_origin(tp) in (list, tuple):
        kwargs.update(nargs=meta.get("nargs", "+"), type=meta.get("parse", str), default=default)
    else:
        kwargs.update(type=meta.get("parse", tp if tp in (int, float, str) else str), default=default)
    quiet = default is None or default is False or default == "" or default == () or "(default" in kwargs["help"]
    if has_default and not quiet and tp is not bool:
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        kwargs["help"] += f" (default: {shown})"
    if "metavar" in meta:
        kwargs["metavar"] = meta["metavar"]
    if not has_default or meta.get("required") or required:
        kwargs["required"] = True
    return kwargs


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one option per field of the dataclass ``cls`` (nested settings included)."""
    for f, tp, required in _fields(cls):
        kwargs = _kwargs(f, tp, required)
        if f.metadata.get("positional"):
            kwargs.pop("required", None)
            if _default(f)[0]:
                kwargs["nargs"] = "?"
            else:
                kwargs.pop("default", None)
            kwargs.setdefault("metavar", f.name.upper())
            parser.add_argument(f.name, **kwargs)
            continue
        flags = [f.metadata.get("flag", "--" + f.name.replace("_", "-")), *f.metadata.get("aliases", ())]
        parser.add_argument(*flags, dest=f.name, **kwargs)


def from_args(cls: type, ns: argparse.Namespace, **overrides: Any):
    """Build ``cls`` from parsed arguments; fields not on the command line keep their
    defaults, nested settings are built from their own fields."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        if f.metadata.get("nested"):
            values[f.name] = from_args(tp, ns)
        elif hasattr(ns, f.name):
            value = getattr(ns, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) and typing.get_origin(tp) is tuple else value
    values.update(overrides)
    return cls(**values)


def option_names(cls: type) -> frozenset[str]:
    """The names (argparse dests) of the options ``add_arguments`` makes for ``cls``."""
    return frozenset(f.name for f, _, _ in _fields(cls))
