"""``NAME=VALUE`` settings onto a frozen options dataclass (the CLI's ``--option``), for its scalar fields."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import TypeVar

T = TypeVar("T")
_SCALARS = ("bool", "int", "float", "str")


def with_settings(options: T, pairs: list[str]) -> T:
    """A copy of ``options`` with ``"name=value"`` settings applied, e.g. ``adain_values=true``; names may use
    dashes. Only bool, int, float and str fields (or ``X | None``, where ``none`` gives None) can be set this way;
    anything else is a one-line error."""
    types = {f.name: str(f.type) for f in fields(options)}
    optional = {n for n, t in types.items() if t.endswith(" | None") and t.removesuffix(" | None") in _SCALARS}
    types = {n: t.removesuffix(" | None") if n in optional else t for n, t in types.items()}
    settable = [n for n, t in types.items() if t in _SCALARS]
    changes = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in settable:
            raise ValueError(f"bad option {pair!r}: use NAME=VALUE with NAME one of {', '.join(settable)}")
        kind, value = types[name], value.strip()
        if name in optional and value.lower() == "none":
            changes[name] = None
        elif kind == "bool":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"option {name} takes true or false, got {value!r}")
            changes[name] = value.lower() in ("true", "1", "yes")
        elif kind in ("int", "float"):
            try:
                changes[name] = int(value) if kind == "int" else float(value)
            except ValueError:
                raise ValueError(f"option {name} takes {'an integer' if kind == 'int' else 'a number'}, "
                                 f"got {value!r}") from None
        else:
            changes[name] = value
    return replace(options, **changes)
