"""Build argparse options from a settings dataclass, so defaults are written once.

Each field's ``metadata`` may hold:
- ``help``: the help text (the default is appended automatically);
- ``choices``: allowed values;
- ``flag``: the option name if not ``--field-name``;
- ``positional``: True for a positional argument;
- ``nargs``: for list/tuple fields (default ``"+"``);
- ``parse``: a callable turning the command-line string into the field's value;
- ``aliases``: more option strings (``-o``);
- ``action``: ``"append"`` for a repeatable option collected into a list;
- ``required``: True to require an option that has a default in Python;
- ``cli``: False to keep a field out of the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def option(default: Any = dataclasses.MISSING, *, help: str, **meta: Any) -> Any:
    """A dataclass field with CLI metadata. Mutable defaults go through default_factory."""
    meta["help"] = help
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    return tp


def add_arguments(parser: argparse.ArgumentParser, cls: type, exclude: frozenset[str] = frozenset()) -> None:
    """Add one option per field of the dataclass ``cls`` (except the ``exclude`` ones)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        if meta.get("cli", True) is False or f.name in exclude:
            continue
        tp = _base_type(hints[f.name])
        origin = typing.get_origin(tp)
        kwargs: dict[str, Any] = {"help": meta.get("help", "")}
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if meta.get("action") == "append":
            kwargs["action"] = "append"
            kwargs["type"] = meta.get("parse", str)
            kwargs["default"] = None
        elif tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["default"] = default
        elif origin in (list, tuple):
            kwargs["nargs"] = meta.get("nargs", "+")
            kwargs["type"] = meta.get("parse", str)
            kwargs["default"] = default
        else:
            kwargs["type"] = meta.get("parse", tp if tp in (int, float, str) else str)
            kwargs["default"] = default
        if has_default and not (default is None or default is False or default == "") and tp is not bool:
            shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            kwargs["help"] += f" (default: {shown})"
        if meta.get("positional"):
            kwargs.pop("default", None) if not has_default else None
            if has_default:
                kwargs["nargs"] = "?"
            parser.add_argument(f.name, metavar=meta.get("metavar", f.name.upper()), **kwargs)
            continue
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        flags = [flag] + list(meta.get("aliases", ()))
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        if not has_default or meta.get("required"):
            kwargs["required"] = True
        parser.add_argument(*flags, dest=f.name, **kwargs)


def from_args(cls: type, ns: argparse.Namespace, **overrides: Any):
    """Build ``cls`` from parsed arguments (fields missing from the CLI keep their defaults)."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(ns, f.name):
            value = getattr(ns, f.name)
            if isinstance(value, list) and typing.get_origin(_base_type(typing.get_type_hints(cls)[f.name])) is tuple:
                value = tuple(value)
            values[f.name] = value
    values.update(overrides)
    return cls(**values)
