"""Frozen model configs built from a checkpoint's config.json.

Each model config is a frozen dataclass whose field names are the config.json keys. `from_dict` takes
the keys it knows, ignores bookkeeping keys, and refuses an architecture-changing value that the
model does not implement, naming the key: a silently ignored key would give wrong numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class UnsupportedConfigError(ValueError):
    """A config.json asks for an architecture this implementation does not have."""


def config_from_dict(
    cls: type[T],
    d: Mapping[str, Any],
    *,
    renames: Mapping[str, str] | None = None,
    checks: Mapping[str, Callable[[Any], bool]] | None = None,
    name: str | None = None,
    **overrides: Any,
) -> T:
    """Builds `cls` from a config dict.

    Args:
      cls: a dataclass whose fields are config keys.
      d: the parsed config.json.
      renames: config key -> field name, for keys whose name differs.
      checks: config key -> predicate on its value; a key that is present and fails raises
        UnsupportedConfigError naming the key and value.
      name: what to call the config in errors (default: the class name).
      overrides: field values that win over `d`.
    """
    label = name or cls.__name__
    renames = dict(renames or {})
    for key, ok in (checks or {}).items():
        if key in d and not ok(d[key]):
            raise UnsupportedConfigError(f"{label}: config key {key!r} = {d[key]!r} is not supported")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        field = renames.get(key, key)
        if field in fields:
            kwargs[field] = tuple(value) if isinstance(value, list) else value
    kwargs.update(overrides)
    missing = [f.name for f in fields.values()
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UnsupportedConfigError(f"{label}: config lacks required key(s) {missing}")
    return cls(**kwargs)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The inverse of `config_from_dict` for saving: fields with tuples as lists."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out
