"""Reading and writing the config dataclasses that are stored as JSON (diffusers' ConfigMixin idea).

A config is a frozen dataclass deriving from `JsonConfig`. `from_dict` reads the dict of a config.json:

  1. anything but a mapping raises ValueError;
  2. each key that is a field is kept (a list becomes a tuple); each other key goes to `_read_key`, and
     if that does not take it and it is not in `_ignored_keys`, it is unknown;
  3. unknown keys draw one warning, or raise ValueError when `_unknown_keys` is "raise";
  4. `_prepare` turns the values kept into the constructor's keyword arguments;
  5. a ValueError or TypeError of the constructor (its validation) is raised again as a ValueError
     that starts with `source`.

`to_dict` writes every field under its own name, tuples as lists. A config sets, for what is its own:

  _source: what messages name when the caller gives no `source`.
  _ignored_keys: keys dropped without a word (bookkeeping, settings without effect).
  _unknown_keys: "warn" or "raise".
  _unknown_keys_message: the warning or error text; "{source}", "{keys}" (the unknown keys, sorted) and
    "{expected}" (the field names, sorted) are filled in.
  _read_key(key, value, source): validates or warns about a key that is not a field; True if it took it.
  _prepare(values, d, source): class defaults, conversions, keys that depend on others.

A warning from `_read_key` or `_prepare` names the caller of `from_dict` with `stacklevel=HOOK_STACKLEVEL`.
This module imports nothing from cxr_ldm, so that every layer can build on it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, ClassVar, Mapping

UNKNOWN_KEY_POLICIES = ("warn", "raise")
HOOK_STACKLEVEL = 4  # hook -> _read_dict -> from_dict -> its caller


def _json_value(value: Any) -> Any:
    """Tuples (nested ones too) -> lists; other values unchanged."""
    return [_json_value(v) for v in value] if isinstance(value, tuple) else value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [2]} -> {"a.b": 1, "c": [2]}: the leaves of nested mappings under dotted names."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """"a.b OLD -> NEW" for each leaf (`flatten`) that differs between two nested configs, in name order.

    Values are written as a config file writes them (lists as tuples: `(32, 32) -> (64, 64)`); a leaf
    on one side only is "absent" on the other.
    """
    old, new = flatten(old), flatten(new)
    absent = object()

    def show(value):
        return "absent" if value is absent else repr(_tuples(value))
    return [f"{key} {show(old.get(key, absent))} -> {show(new.get(key, absent))}"
            for key in sorted(set(old) | set(new)) if old.get(key, absent) != new.get(key, absent)]


def _tuples(value: Any) -> Any:
    """Lists (nested ones too) -> tuples; other values unchanged."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class JsonConfig:
    """Mixin of a frozen dataclass stored as JSON: `from_dict`, `from_file` and `to_dict` (module doc)."""

    _source: ClassVar[str] = "config"
    _ignored_keys: ClassVar[frozenset[str]] = frozenset()
    _unknown_keys: ClassVar[str] = "warn"
    _unknown_keys_message: ClassVar[str] = "{source}: unknown keys {keys} are ignored"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls._unknown_keys not in UNKNOWN_KEY_POLICIES:
            raise TypeError(f"{cls.__name__}._unknown_keys = {cls._unknown_keys!r}; "
                            f"expected one of {UNKNOWN_KEY_POLICIES}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | None = None):
        """Reads a config dict (the contents of a config.json).

        Missing keys take the field defaults. Unknown keys warn (or raise); values the config cannot
        take raise ValueError naming `source` (default: the class's `_source`) and the key.
        """
        return cls._read_dict(d, cls._source if source is None else source)

    @classmethod
    def from_file(cls, path: str | os.PathLike):
        """Reads a config.json file; messages name its path."""
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Every field under its own name, tuples as lists."""
        return {k: _json_value(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def _read_key(cls, key: str, value: Any, source: str) -> bool:
        """Checks a key that is not a field; True if the key is known (and is then dropped)."""
        return False

    @classmethod
    def _prepare(cls, values: dict[str, Any], d: Mapping[str, Any], source: str) -> dict[str, Any]:
        """The field values read from `d` -> the keyword arguments of the constructor."""
        return values

    @classmethod
    def _read_dict(cls, d: Mapping[str, Any], source: str):
        """The work of `from_dict`, called by it directly: its warnings name the caller of `from_dict`."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        values, unknown = {}, []
        for key, value in d.items():
            if key in fields:
                values[key] = tuple(value) if isinstance(value, list) else value
            elif not cls._read_key(key, value, source) and key not in cls._ignored_keys:
                unknown.append(key)
        if unknown:
            message = cls._unknown_keys_message.format(source=source, keys=sorted(unknown),
                                                       expected=sorted(fields))
            if cls._unknown_keys == "raise":
                raise ValueError(message)
            warnings.warn(message, stacklevel=HOOK_STACKLEVEL - 1)
        values = cls._prepare(values, d, source)
        try:
            return cls(**values)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{source}: {err}") from err
