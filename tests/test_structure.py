"""The code's shape, checked: every import points down the layers (no cycle), units stay small."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "prefpretrain"

# bottom to top; a module may import its own layer (without a cycle) and the layers below it
LAYERS = [
    ("base", ["prefpretrain", "prefpretrain.errors", "prefpretrain.host", "prefpretrain.rundir", "prefpretrain.logs",
              "prefpretrain.typed", "prefpretrain.distributed"]),
    ("data", ["prefpretrain.data_shards"]),
    ("objectives", ["prefpretrain.objectives", "prefpretrain.conditioning", "prefpretrain.losses",
                    "prefpretrain.auxiliary"]),
    ("config", ["prefpretrain.config", "prefpretrain.config_docs"]),
    ("trainer", ["prefpretrain.trainer"]),
    ("continual", ["prefpretrain.continual"]),
    ("launcher", ["prefpretrain.launcher", "prefpretrain.report"]),
    ("cli", ["prefpretrain.preflight", "prefpretrain.cli", "prefpretrain.__main__"]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Every prefpretrain module each module imports (at the top or inside a function)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for n in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                names = [n.module] + [f"{n.module}.{a.name}" for a in n.names]
            edges[m] |= {x for x in names if x in mods and x != m}
    return edges


def _layer(m: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if (m == pre or m.startswith(pre + ".")) and (best is None or len(pre) > best[1]):
                best = (i, len(pre))
    assert best is not None, f"{m}: in no layer of tests/test_structure.py"
    return best[0]


def test_every_import_points_down_the_layers():
    edges = _imports(_modules())
    up = [f"{m} ({LAYERS[_layer(m)][0]}) -> {x} ({LAYERS[_layer(x)][0]})"
          for m, xs in edges.items() for x in xs if _layer(x) > _layer(m) and x != "prefpretrain"]
    assert not up, "upward imports:\n" + "\n".join(sorted(up))


def test_no_import_cycle():
    edges = _imports(_modules())
    edges = {m: {x for x in xs if x != "prefpretrain"} for m, xs in edges.items()}  # (the package: a version)
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for x in sorted(edges[m]):
            if state.get(x) == 1:
                cycles.append(" -> ".join(path[path.index(x):] + [x]))
            elif x not in state:
                visit(x, path + [x])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_units_stay_small():
    big_files = [f"{p.relative_to(ROOT.parent)}: {n} lines" for p in ROOT.rglob("*.py")
                 if (n := len(p.read_text().splitlines())) > 400]
    big_funcs = []
    for p in ROOT.rglob("*.py"):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80:
                big_funcs.append(f"{p.relative_to(ROOT.parent)}:{n.lineno} {n.name}: {n.end_lineno - n.lineno + 1}")
    assert not big_files and not big_funcs, "\n".join(big_files + big_funcs)


def test_the_trainer_knows_no_extension():
    """Continual updates reach the trainer through its hooks only."""
    edges = _imports(_modules())
    bad = [f"{m} -> {x}" for m, xs in edges.items() if m.startswith("prefpretrain.trainer")
           for x in xs if x.startswith("prefpretrain.continual")]
    assert not bad, bad
