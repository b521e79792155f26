"""Typed YAML configuration: the engine under recipes (`repro.recipe`) and Slurm cluster profiles.

A file is data only. It may inherit from other files with `_base_` (a path or a list of paths
relative to the file, merged left to right, the file's own keys last; mappings merge key by key,
everything else is replaced), use `${ENV_VAR}` / `${ENV_VAR:-default}` in strings, and be changed
with dotted overrides (`optim.lr=5e-4`, values read as YAML). The schema is a tree of dataclasses
whose fields are declared with `key()`: typed, documented, optionally checked. Anything else is a
one-line `ConfigError` naming the file that set the key (provenance is tracked through `_base_`
files and overrides) and the dotted key, with a suggestion for a misspelt one.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml

from repro.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem, as one line: `FILE: KEY: what is wrong`."""

    def __init__(self, file: str | os.PathLike | None, key: str | None, message: str):
        self.file = str(file) if file is not None else None
        self.key = key
        self.message = message
        where = ": ".join(p for p in (self.file, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


# --------------------------------------------------------------------------------------------
# Declaring keys

def key(default: Any = dataclasses.MISSING, doc: str = "", *, check=None, name: str | None = None,
        **meta):
    """A schema key: its default, one-line documentation, an optional `check(value) -> problem
    or None`, and any other metadata the schema's users read (`dataclasses.fields(...)`).
    `name`: the key's name in YAML when it cannot be the attribute's (`from`, a keyword)."""
    metadata = {"doc": doc, "check": check, **meta}
    if name is not None:
        metadata["key"] = name
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


def positive(v):
    return None if v > 0 else "must be > 0"


def non_negative(v):
    return None if v >= 0 else "must be >= 0"


def fraction(v):
    return None if 0 <= v <= 1 else "must be within [0, 1]"


def pair(v):
    return None if len(v) == 2 else "must have exactly 2 values"


def triple(v):
    return None if len(v) == 3 else "must have exactly 3 values"


def key_name(f: dataclasses.Field) -> str:
    """The YAML name of a schema field (its attribute name unless `key(name=...)` says)."""
    return f.metadata.get("key", f.name)


def plain(value):
    if dataclasses.is_dataclass(value):
        return {key_name(f): plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
# YAML reading: YAML 1.1 reads `1e-3` as a string; recipes are full of such numbers, so floats
# are recognised the YAML 1.2 way.

class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        problem = " ".join(str(e.problem or e.context or "invalid YAML").split())
        raise ConfigError(f"{path}{line}", None, f"YAML syntax error: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(path, None, f"YAML error: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, None, f"must be a mapping of keys, got {type(data).__name__}")
    return data


def _merge(base: dict, top: dict, prov: dict, top_file: str, prefix: str = "") -> dict:
    """Merge `top` over `base` (mappings key by key, other values replaced); record provenance."""
    out = dict(base)
    for key, value in top.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, prov, top_file, dotted + ".")
        else:
            out[key] = value
            for k in [k for k in prov if k == dotted or k.startswith(dotted + ".")]:
                del prov[k]
            _record(value, dotted, prov, top_file)
    return out


def _record(value, dotted: str, prov: dict, file: str):
    prov[dotted] = file
    if isinstance(value, dict):
        for k, v in value.items():
            _record(v, f"{dotted}.{k}", prov, file)


def _load_tree(path: Path, chain: tuple[Path, ...], prov: dict) -> dict:
    """Read `path` with its `_base_` files resolved; `prov` maps dotted keys to files."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain[chain.index(path):], path))
        raise ConfigError(chain[-1], "_base_", f"cyclic _base_ inheritance: {cycle}")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(path, "_base_", "must be a path or a list of paths")
    merged: dict = {}
    for base in bases:
        base_path = (path.parent / _interpolate(base, path, "_base_")).resolve()
        if not base_path.is_file():
            raise ConfigError(path, "_base_", f"base file not found: {base} ({base_path})")
        base_prov: dict = {}
        base_data = _load_tree(base_path, (*chain, path), base_prov)
        merged = _merge(merged, base_data, prov, str(base_path))
        prov.update(base_prov)
    return _merge(merged, data, prov, str(path))


# --------------------------------------------------------------------------------------------
# Environment interpolation

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(text: str, file, key: str) -> str:
    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        value = os.environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ConfigError(file, key, f"environment variable {name} is not set "
                                  f"(set it, or write ${{{name}:-default}})")
            return default
        return value

    return _ENV.sub(sub, text)


def _interpolate_tree(value, prov: dict, default_file, key: str = ""):
    if isinstance(value, str):
        return _interpolate(value, prov.get(key, default_file), key)
    if isinstance(value, dict):
        return {k: _interpolate_tree(v, prov, default_file, f"{key}.{k}" if key else k)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate_tree(v, prov, default_file, key) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# Overrides

def parse_override(text: str) -> tuple[str, Any]:
    """Split `key.sub=value` and read the value as a YAML scalar, list or mapping."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
        raise ConfigError(None, None, f"override '{text}' is not of the form key.sub=value")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # an unquoted string YAML cannot read is still a fine string
    return key, value


def _set_dotted(tree: dict, key: str, value) -> Any:
    """Set `a.b.c` in nested dicts; return the previous value (or _ABSENT)."""
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    old = node.get(parts[-1], _ABSENT)
    node[parts[-1]] = value
    return old


_ABSENT = object()


# --------------------------------------------------------------------------------------------
# The schema

def all_keys(cls, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every dotted key of schema `cls` and its field declaration."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.update(all_keys(t, f"{prefix}{key_name(f)}."))
        else:
            out[f"{prefix}{key_name(f)}"] = f
    return out


def sections(cls) -> dict[str, dataclasses.Field]:
    """The top-level keys of schema `cls`."""
    return {key_name(f): f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _suggest(dotted: str, root) -> str:
    keys = list(all_keys(root)) + [f.name for f in dataclasses.fields(root)
                                    if not f.metadata.get("internal")]
    leaf = dotted.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k != dotted]
    close = same_leaf or difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in keys], n=1)
        close = [k for k in keys if close and k.endswith("." + close[0])][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(t) -> str:
    origin = typing.get_origin(t)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(t))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(t))
    if origin is list:
        return f"list of {_type_name(typing.get_args(t)[0])}"
    if origin is dict:
        return "mapping"
    return {type(None): "null"}.get(t, getattr(t, "__name__", str(t)))


def _coerce(value, t, where) -> Any:
    """Check `value` against type `t`; return it converted (int -> float only)."""
    origin = typing.get_origin(t)
    if t is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        raise where(f"expected {_type_name(t)}, got {_describe(value)}")
    if origin is Literal:
        choices = typing.get_args(t)
        if value not in choices:
            raise where(f"bad value {value!r}; choose one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise where(f"expected {_type_name(t)}, got {_describe(value)}")
        (item,) = typing.get_args(t)
        return [_coerce(v, item, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise where(f"expected a mapping, got {_describe(value)}")
        return dict(value)
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif t is bool or t is str:
        if isinstance(value, t):
            return value
    raise where(f"expected {_type_name(t)}, got {_describe(value)}")


def _describe(value) -> str:
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"


def _build(cls, data, prefix: str, prov: dict, default_file, root=None):
    """Turn a (merged) mapping into dataclass `cls`, checking every key and value."""
    def err_for(key):
        return lambda msg: ConfigError(prov.get(key, default_file), key, msg)

    if not isinstance(data, dict):
        key = prefix.rstrip(".")
        raise err_for(key)(f"expected a mapping of keys, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {key_name(f): f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            dotted = f"{prefix}{key}"
            raise ConfigError(prov.get(dotted, default_file), dotted,
                              f"unknown key{_suggest(dotted, root or cls)}")
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{prefix}{name}"
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            kwargs[f.name] = _build(t, data.get(name, {}) or {}, dotted + ".", prov,
                                    default_file, root or cls)
            continue
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(default_file, dotted, "missing required key")
            continue
        value = _coerce(data[name], t, err_for(dotted))
        check = f.metadata.get("check")
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise err_for(dotted)(f"bad value {data[name]!r}: {problem}")
        kwargs[f.name] = value
    return cls(**kwargs)


def get_dotted(obj, key: str):
    for part in key.split("."):
        names = {key_name(f): f.name for f in dataclasses.fields(obj)}
        obj = getattr(obj, names.get(part, part))
    return obj


# --------------------------------------------------------------------------------------------
# Loading

def read(path: str | os.PathLike, schema, overrides: list[str] | tuple[str, ...] = (),
         what: str = "file") -> tuple[dict, dict, dict]:
    """Read `path` with its `_base_` files, interpolate `${ENV}` and apply `overrides`.

    Returns (tree, from_file, provenance): the merged mapping with the overrides, the same
    without them (both interpolated), and which file (or override) set each dotted key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, None, f"{what} not found")
    prov: dict[str, str] = {}
    tree = _load_tree(path, (), prov)
    file = str(path)
    from_file = _interpolate_tree(tree, prov, file)
    for text in overrides:
        try:
            dotted, value = parse_override(text)
        except ConfigError as e:
            raise ConfigError(file, None, e.message) from None
        if dotted not in all_keys(schema) and dotted not in sections(schema):
            raise ConfigError(file, dotted,
                              f"unknown key in override '{text}'{_suggest(dotted, schema)}")
        _set_dotted(tree, dotted, value)
        for k in [k for k in prov if k == dotted or k.startswith(dotted + ".")]:
            del prov[k]
        _record(value, dotted, prov, f"{file} (override '{text}')")
    return _interpolate_tree(tree, prov, file), from_file, prov


def build(schema, tree: dict, prov: dict, file: str):
    """The dataclass tree of `schema` from a mapping, every key and value checked."""
    return _build(schema, tree, "", prov, file)


def load_typed(path: str | os.PathLike, cls):
    """Read a YAML file (with `_base_` and `${ENV}`) into dataclass `cls`, every key checked."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, None, "file not found")
    prov: dict[str, str] = {}
    tree = _interpolate_tree(_load_tree(path, (), prov), prov, str(path))
    return _build(cls, tree, "", prov, str(path))
