"""An experiment's parameters: one frozen dataclass per experiment holds their names, types and defaults.

`parse_params` checks what a caller gives (a notebook, the CLI's ``--param``, a widget) against that dataclass and
answers a mistake with one sentence listing the valid parameters, before any model runs:

>>> @dataclasses.dataclass(frozen=True)
... class P:
...     rho: float = 0.2
...     layers: tuple[int, ...] | None = None
>>> parse_params("demo", P, {"rho": 0.5})
{'rho': 0.5, 'layers': None}
>>> try:
...     parse_params("demo", P, {"rho": "abc"})
... except ValueError as err:
...     print(err)
demo: parameter rho must be a number, got 'abc'; its parameters are rho (a number, default 0.2), layers (a list of integers or None, default None).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from typing import Any


def describe(hint) -> str:
    """A type annotation in words (``tuple[int, ...] | None`` -> "a list of integers or None")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in (tuple, list, collections.abc.Sequence):
        inner = describe(args[0]) if args and args[0] is not Ellipsis else "values"
        return "a list of " + plural(inner)
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "None",
            Any: "any value"}.get(hint, getattr(hint, "__name__", str(hint)))


def plural(words: str) -> str:
    for one, many in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings"),
                      ("true or false", "booleans"), ("any value", "values")):
        words = words.replace(one, many)
    return words


def fits(value, hint) -> bool:
    """Whether ``value`` has the type ``hint`` describes (ints count as numbers; lists and tuples as sequences)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
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
    if origin in (tuple, list, collections.abc.Sequence):
        item = args[0] if args and args[0] is not Ellipsis else Any
        return isinstance(value, (list, tuple)) and all(fits(v, item) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return True  # a type this checker does not know: the experiment's own resolve validates it


def listing(cls) -> str:
    hints = typing.get_type_hints(cls)
    return ", ".join(f"{f.name} ({describe(hints[f.name])}, default {default_of(f)!r})"
                     for f in dataclasses.fields(cls))


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def defaults(cls) -> dict:
    """The parameters and their defaults (a field without one is required: ``dataclasses.MISSING``)."""
    return {f.name: default_of(f) for f in dataclasses.fields(cls)}


def parse_params(experiment: str, cls, given: dict) -> dict:
    """``given`` checked against the dataclass ``cls`` and completed with its defaults; raises ValueError with one
    sentence naming the fix for an unknown name, a missing required one or a value of the wrong type."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in given if k not in known]
    if unknown:
        raise ValueError(f"{experiment}: no parameter {', '.join(map(repr, unknown))}; its parameters are "
                         f"{listing(cls)}.")
    out = {}
    for f in dataclasses.fields(cls):
        value = given.get(f.name, default_of(f))
        if value is dataclasses.MISSING:
            raise ValueError(f"{experiment}: parameter {f.name} is required ({describe(hints[f.name])}); its "
                             f"parameters are {listing(cls)}.")
        if not fits(value, hints[f.name]):
            raise ValueError(f"{experiment}: parameter {f.name} must be {describe(hints[f.name])}, got {value!r}; "
                             f"its parameters are {listing(cls)}.")
        out[f.name] = value
    cls(**out)  # the dataclass's own checks (__post_init__), if it has any
    return out


__all__ = ["parse_params", "defaults", "describe", "fits"]
