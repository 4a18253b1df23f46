"""Typer options generated from a config dataclass, so a CLI does not restate the fields it exposes.

A field becomes ``--field-name`` with the field's default and the help in its metadata::

    steps: int = field(default=1000, metadata={"help": "Optimizer steps."})

Metadata keys: ``help``; ``cli=False`` hides the field; ``param`` renames the option (``teacher_rate``);
``cli_default`` gives the CLI another default (``None``: "decided by the command"); ``panel`` groups it in
``--help``. :func:`config_options` decorates a command: the generated options arrive as one dict of field values
per config class, under the keyword the decorator names, and only the command's own options stay in its signature.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any

import typer

_UNIONS = (typing.Union, types.UnionType)


def _cli_type(hint: Any) -> Any:
    """A type typer takes: ``X | None`` stays; a union of several types becomes ``Path`` (if one is) or ``str``."""
    if typing.get_origin(hint) not in _UNIONS:
        return hint
    members = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = len(members) < len(typing.get_args(hint))
    base = members[0] if len(members) == 1 else (Path if Path in members else str)
    return base | None if optional else base


def dataclass_parameters(cls: type, *, prefix: str = "", panel: str | None = None) -> dict[str, tuple[str, Any]]:
    """``parameter name -> (field name, inspect.Parameter)`` for every CLI-visible field of ``cls``."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[str, Any]] = {}
    for f in fields(cls):
        meta = f.metadata
        if meta.get("cli", True) is False or "help" not in meta:
            continue
        name = meta.get("param", prefix + f.name)
        default = meta.get("cli_default", f.default if f.default is not MISSING else None)
        hint = _cli_type(hints[f.name])
        if default is None and typing.get_origin(hint) not in _UNIONS:
            hint = hint | None
        flags = (f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}",) if hint is bool else ()
        option = typer.Option(*flags, help=meta["help"], rich_help_panel=meta.get("panel", panel))
        annotation = Annotated[hint, option]
        out[name] = (f.name, inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                               annotation=annotation))  # fmt: skip
    return out


def config_options(cls: type, into: str, *, prefix: str = "", panel: str | None = None) -> Callable:
    """Decorate a typer command so that ``cls``'s CLI-visible fields are options, handed to it as
    ``into={field: value}``; the command's own parameters keep their place (and win on a name clash)."""

    def decorate(command: Callable) -> Callable:
        own = inspect.signature(command, eval_str=True)
        generated = {n: p for n, p in dataclass_parameters(cls, prefix=prefix, panel=panel).items()
                     if n not in own.parameters}  # fmt: skip
        kept = [p for p in own.parameters.values() if p.name != into]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {field_name: kwargs.pop(name) for name, (field_name, _) in generated.items()}
            return command(**kwargs, **{into: values})

        params = kept + [p for _, p in generated.values()]
        positional = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
        wrapper.__signature__ = inspect.Signature(positional)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in positional}
        del wrapper.__wrapped__  # typer must read the new signature, not the command's
        return wrapper

    return decorate
