"""Imports point one way: each package of saint imports only the layers below it
(the graph drawn in docs/architecture.md). A few lines over ``ast``, no dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import saint

SRC = Path(saint.__file__).parent

# top to bottom; a unit may import units of lower layers only (never a peer or above)
LAYERS: list[tuple[str, ...]] = [
    ("cli",),
    ("commands",),  # argparse lives here only
    ("integrations",),  # lmms-eval plugin
    ("bench", "analysis"),  # bench may use eval (sweep = speed + fidelity)
    ("eval",),
    ("measure",),  # harness, timing, FLOPs, memory, image sets, reports
    ("spec",),  # method specs / option parsing, no argparse
    ("calibration",),
    ("api",),
    ("adapters",),
    ("methods",),
    ("core", "assets", "timing"),
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit_of(parts: list[str]) -> str | None:
    """The layer unit of a module path inside saint (``["bench", "vlm"]`` -> bench)."""
    return parts[0] if parts and parts[0] in RANK else None


def imported_modules(path: Path, root: Path = SRC) -> list[tuple[int, list[str]]]:
    """(line, module path inside saint) of every saint import in a file, at any depth."""
    package = list(path.relative_to(root).parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                mod = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "saint":
                mod = node.module.split(".")[1:]
            else:
                continue
            if node.module is None or not mod:  # "from . import x": each name may be a module
                out += [(node.lineno, mod + [a.name]) for a in node.names]
            else:
                out.append((node.lineno, mod))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "saint"]
    return out


def violations(root: Path = SRC) -> list[str]:
    """Every import in the tree at ``root`` that points up or sideways."""
    wrong = []
    for path in sorted(root.rglob("*.py")):
        src = unit_of(list(path.relative_to(root).with_suffix("").parts))
        if src is None:  # saint/__init__.py: the public surface may import anything
            continue
        for line, mod in imported_modules(path, root):
            dst = unit_of(mod)
            if dst is not None and dst != src and RANK[dst] <= RANK[src]:
                wrong.append(f"{path.relative_to(root)}:{line} ({src}) imports {'.'.join(mod)} ({dst})")
    return wrong


def test_every_unit_is_placed_in_a_layer():
    units = {p.stem for p in SRC.iterdir() if p.suffix == ".py"} | {p.name for p in SRC.iterdir() if (p / "__init__.py").exists()}
    assert sorted(units - set(RANK) - {"__init__"}) == []


def test_imports_point_down():
    assert violations() == []


def test_the_checker_reports_wrong_imports(tmp_path):
    """The rule can fail: upward and sideways imports, relative, absolute or nested."""
    root = tmp_path / "saint"
    for pkg in ("core", "analysis", "measure"):
        (root / pkg).mkdir(parents=True)
    (root / "core" / "bad.py").write_text("from ..adapters import find_adapter\n")
    (root / "analysis" / "peer.py").write_text("def f():\n    from saint.bench import sweep\n")
    (root / "measure" / "ok.py").write_text("from .. import api\nfrom ..core import gather\n")
    assert violations(root) == [
        "analysis/peer.py:2 (analysis) imports bench (bench)",
        "core/bad.py:1 (core) imports adapters (adapters)",
    ]


def test_argparse_only_in_commands():
    users = sorted(
        str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
        if "argparse" in p.read_text() and p.relative_to(SRC).parts[0] not in ("commands", "cli.py")
    )  # fmt: skip
    assert users == []
