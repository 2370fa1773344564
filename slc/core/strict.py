"""Typed, strict config records: a frozen pydantic dataclass per params.yaml section, whose every
failure is a ConfigError of one line naming the key's dotted path.
"""
from __future__ import annotations

import dataclasses
import json
import typing

from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass

from slc.core.errors import ConfigError


def strict(cls):
    """A frozen pydantic dataclass, strict ("five", 2.5 or true for an int is an error, not a guess;
    an int still makes a float). It stays a dataclass, so `dataclasses.replace` (which re-validates)
    and `asdict` work, and its every failure, a direct construction's too, is a ConfigError."""
    cls = dataclass(frozen=True, config=ConfigDict(extra="forbid", strict=True))(cls)
    validate = cls.__init__

    def __init__(self, *args, **kwargs):
        try:
            validate(self, *args, **kwargs)
        except ValidationError as error:
            raise _config_error(type(self), error, type(self).__name__) from None

    cls.__init__ = __init__
    return cls


def from_dict(cls, raw, path: str = ""):
    """Build config class `cls` from nested dicts; `path` is where `raw` sits in params.yaml."""
    # via JSON: strict Python mode takes only instances for the sections, strict JSON mode takes objects
    try:
        return cls.__pydantic_validator__.validate_json(json.dumps(raw, default=str))
    except ValidationError as error:
        raise _config_error(cls, error, path) from None


def _config_error(cls, error: ValidationError, path: str) -> ConfigError:
    """pydantic's first error as one line that names the key's dotted path (an unknown key first:
    it is likely the typo of a missing one)."""
    first = min(error.errors(), key=lambda e: not e["type"].startswith("unexpected"))
    if first["type"] == "value_error" and isinstance(first["ctx"]["error"], ConfigError):
        return first["ctx"]["error"]  # a range check of __post_init__, already worded
    hint, where = cls, path
    for key in first["loc"]:  # down to the key's declared type; a union's option name or an unknown key stops it
        if isinstance(key, int) and dataclasses.is_dataclass(hint) and key < len(hint.__pydantic_fields__):
            key = list(hint.__pydantic_fields__)[key]  # a positional argument of a direct construction
        if isinstance(key, int) and typing.get_origin(hint) is list:
            hint, where = typing.get_args(hint)[0], f"{where}[{key}]"
        elif dataclasses.is_dataclass(hint) and key in hint.__pydantic_fields__:
            hint, where = hint.__pydantic_fields__[key].annotation, f"{where}.{key}".lstrip(".")
        else:
            break
    expected = str(hint) if typing.get_args(hint) else hint.__name__
    if first["type"].startswith("unexpected"):
        key = f"{where}.{first['loc'][-1]}".lstrip(".")
        names = ", ".join(field.name for field in dataclasses.fields(hint))
        return ConfigError(f"unknown key {key}: the keys of {where or 'params.yaml'} are {names}")
    if first["type"] == "missing":
        return ConfigError(f"missing key {where} ({expected})")
    if first["type"] == "dataclass_type":
        return ConfigError(f"{where or 'params.yaml'}: expected a mapping of keys, got {first['input']!r}")
    return ConfigError(f"{where} = {first['input']!r} has the wrong type: expected {expected}")


def require(ok: bool, path: str, value, expected: str):
    if not ok:
        raise ConfigError(f"{path} = {value!r} is invalid: expected {expected}")
