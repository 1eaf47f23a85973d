"""Typed dataclass trees from YAML-like data: coercion with one-line errors naming the dotted key, `a.b=value`
overrides, and each field's documentation (its trailing `# comment` in the source).

Generic: nothing here knows prefpretrain's config sections (prefpretrain.config declares them).
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal, get_args, get_origin

import yaml

from prefpretrain.errors import ConfigError


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "").replace("prefpretrain.config.", "")
    return getattr(tp, "__name__", str(tp))


def _scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: expected one of {type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(value, list):
            value = [value]
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        short = getattr(tp, "FROM_STR", None)  # e.g. a shard set given as its path alone
        if short and isinstance(value, str):
            value = {short: value}
        return from_dict(tp, value, key)
    return _scalar(value, tp, key)


def from_dict(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    aliases = getattr(cls, "ALIASES", {})
    data = {aliases.get(k, k): v for k, v in data.items()}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def apply_override(root: type, raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override to the raw dict of a `root` tree; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"{item}: an override must look like key.sub=value")
    key, _, text = item.partition("=")
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as e:  # an alias, a tag, unbalanced brackets...
        raise ConfigError(f"{key.strip()}: not a plain YAML value ({str(e).splitlines()[0]})") from None
    parts = key.strip().split(".")
    node: Any = raw
    cls: Any = root
    for i, p in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        p = getattr(cls, "ALIASES", {}).get(p, p)
        if not (dataclasses.is_dataclass(cls) and p in {f.name for f in dataclasses.fields(cls)}):
            raise ConfigError(f"{dotted}: unknown key")
        if i == len(parts) - 1:
            node[p] = yaml.safe_load(text) if text.strip() else ""
            return
        cls = typing.get_type_hints(cls)[p]
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: cannot set a sub-key of a non-mapping value")
        node = nxt


def _comments(source: str) -> dict[int, str]:
    """Line number (1-based) -> the text of the comment on that line."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _own_comments(cls: type) -> dict[str, str]:
    """The fields one class body declares -> their trailing comments (continued by comment-only lines below)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = _comments(source)
    (node,) = ast.parse(source).body
    out = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        parts = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
        n = stmt.end_lineno + 1
        while n <= len(lines) and lines[n - 1].strip().startswith("#"):
            parts.append(comments[n])
            n += 1
        out[stmt.target.id] = " ".join(p for p in parts if p)
    return out


def dataclass_mro(cls: type) -> list[type]:
    """The dataclasses a class's fields come from, base classes first."""
    return [c for c in reversed(cls.__mro__) if dataclasses.is_dataclass(c) and "__dataclass_fields__" in vars(c)]


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its description, also for fields inherited from a base dataclass (the subclass wins)."""
    out: dict[str, str] = {}
    for c in dataclass_mro(cls):
        out.update({k: v for k, v in _own_comments(c).items() if v or k not in out})
    return out


def field_docs_of(cls: type) -> list[tuple[str, str, Any, str]]:
    """[(field, type name, default, comment)] of one dataclass (no default: dataclasses.MISSING)."""
    comments, hints, rows = field_comments(cls), typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((f.name, type_name(hints[f.name]), default, comments.get(f.name, "")))
    return rows


def field_docs(root: type) -> Iterator[tuple[str, list[tuple[str, str, Any, str]]]]:
    """Per section of a two-level tree: (section, [(key, type name, default, comment)])."""
    for sec in dataclasses.fields(root):
        yield sec.name, field_docs_of(typing.get_type_hints(root)[sec.name])
