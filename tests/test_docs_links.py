"""Every relative link in the README and docs/ points at a file that exists (and, for a
``#anchor`` into a markdown file, at one of its headings), so moving results cannot
leave dead links behind; the README's first Python examples run as printed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for a markdown file's headings."""
    heads = re.findall(r"^#+ (.*)$", path.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def links(path: Path) -> list[str]:
    return [m for m in re.findall(r"\]\(([^)\s]+)\)", path.read_text()) if not re.match(r"\w+://|mailto:", m)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path):
    dead = []
    for link in links(doc):
        file, _, anchor = link.partition("#")
        target = (doc.parent / file).resolve() if file else doc
        if not target.exists():
            dead.append(link)
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            dead.append(link)
    assert not dead, f"{doc.name}: dead links {dead}"


def test_the_check_finds_a_dead_link(tmp_path: Path):
    doc = tmp_path / "x.md"
    doc.write_text("# Title\n[a](x.md#title) [b](missing.md) [c](#nowhere) [d](https://example.com)\n")
    assert links(doc) == ["x.md#title", "missing.md", "#nowhere"]
    assert anchors(doc) == {"title"}


def test_the_readme_python_api_examples_run(capsys):
    """The README's first two examples (patch, forward, stats, unpatch; the per-layer
    schedules) run as printed, on a random-weight DeiT-S at 224px."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert "saint.patch(model" in blocks[0] and "saint.patch(model" in blocks[1]
    namespace: dict = {}
    exec(blocks[0], namespace)
    assert "blocks.11:" in capsys.readouterr().out  # the stats of every block were printed
    assert not namespace["saint"].is_patched(namespace["model"])
    exec(blocks[1], namespace)
    assert namespace["saint"].is_patched(namespace["model"])
