"""docs/configuration.md, generated from the config dataclasses of `prefpretrain.config`.

Each field's description is its trailing `# comment` in its dataclass's source (with the comment-only lines
right below it, which continue it). The sections are the fields of `prefpretrain.config.Config`.

    python -m prefpretrain.config_docs                                # print the page
    python -m prefpretrain.config_docs --check docs/configuration.md  # exit 1 if the file is not current
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from prefpretrain.config import Config
from prefpretrain.typed import dataclass_mro, field_comments

REGENERATE = "python -m prefpretrain.config_docs > docs/configuration.md"

INTRO = f"""\
<!-- Generated from the config dataclasses by `{REGENERATE}`; do not edit by hand. -->
# Configuration reference

One typed dataclass tree (`prefpretrain/config.py`). YAML files mirror it: `configs/demo.yaml` is the
commented embedded default, `configs/tiny.yaml` a seconds-long run. Every command that takes a config also
takes dotted overrides whose values are read as YAML: `train.max_steps=20`,
`data.shards='[data/a, {{path: data/b, weight: 3}}]'`, `engine.zero_stage=3`. An unknown key, a wrong type or an
impossible value fails before any process starts, with one line that names the key (exit code 2).
`prefpretrain train --help` lists the same keys.

Each description below is the field's trailing comment in its dataclass (the file is named under each
section); change it there and regenerate this page. The README and the topic pages under `docs/` explain how
the settings work together.
"""


def defined_in(cls: type) -> str:
    """"`Name` in `path.py`", with the base dataclasses its fields also come from."""
    where = [f"`{c.__name__}` in `{c.__module__.replace('.', '/')}.py`" for c in reversed(dataclass_mro(cls))]
    return where[0] + (f" (fields also from {', '.join(where[1:])})" if len(where) > 1 else "")


def class_doc(cls: type) -> str:
    """The class's own docstring (not the signature dataclasses make up for a class without one)."""
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    doc = ast.get_docstring(node) or ""
    return " ".join(doc.split())


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in get_args(tp))}]"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def default_of(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, str) and value:
        return value
    return json.dumps(value)


def _cell(text: str, code: bool = False) -> str:
    text = text.replace("|", "\\|")
    return f"`{text}`" if code and text else text


def rows(cls: type, prefix: str) -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every field; lists of dataclasses add `key[].sub` rows."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    yaml_name = {v: k for k, v in getattr(cls, "ALIASES", {}).items()}
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{yaml_name.get(f.name, f.name)}"
        tp = hints[f.name]
        out.append((key, type_name(tp), default_of(f), comments.get(f.name, "")))
        item = get_args(tp)[0] if get_origin(tp) is list else None
        if dataclasses.is_dataclass(item):
            out.extend(rows(item, f"{key}[]"))
    return out


def render() -> str:
    parts = [INTRO]
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        parts.append(f"\n## {section.name}\n\n{defined_in(cls)}.")
        doc = class_doc(cls)
        parts.append(f" {doc}\n" if doc else "\n")
        parts.append("\n| key | type | default | description |\n|---|---|---|---|\n")
        for key, tp, default, desc in rows(cls, section.name):
            parts.append(f"| {_cell(key, True)} | {_cell(tp, True)} | {_cell(default, True)} | {_cell(desc)} |\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prefpretrain.config_docs", description=__doc__.splitlines()[0])
    ap.add_argument("--check", metavar="FILE", help="exit 1 with one line if FILE is not the current page")
    a = ap.parse_args(argv)
    text = render()
    if a.check is None:
        sys.stdout.write(text)
        return 0
    path = Path(a.check)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        print(f"{path}: not current; run `{REGENERATE}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
