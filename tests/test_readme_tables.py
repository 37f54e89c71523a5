"""The result tables of the README and docs/results.md are the committed JSON, rendered by one script."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "readme_tables.py"


def load():
    spec = importlib.util.spec_from_file_location("readme_tables", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_tables_match_the_committed_json():
    mod = load()
    shown = set()
    for path in mod.DOCS:
        text = path.read_text()
        assert mod.render(text) == text, f"{path.name}: run python benchmarks/readme_tables.py"
        shown |= set(re.findall(r"<!-- table:(\w+) -->", text))
    assert shown == set(mod.TABLES)  # every table is shown somewhere, and no marker names an unknown one


def test_an_edited_number_is_put_back():
    mod = load()
    for path in mod.DOCS:
        text = path.read_text()
        edited = text.replace("| ToMe r=13 | 1.40x |", "| ToMe r=13 | 9.99x |")
        assert mod.render(edited) == text
    assert any("| ToMe r=13 | 1.40x |" in path.read_text() for path in mod.DOCS)


def test_a_new_empty_table_is_filled_and_swallows_nothing():
    mod = load()
    for path in mod.DOCS:
        text = path.read_text()
        start = text.index("<!-- table:dinov2_224_targets -->")
        end = text.index("<!-- /table -->", start)
        emptied = text[:start] + "<!-- table:dinov2_224_targets -->\n" + text[end:]
        assert emptied != text and mod.render(emptied) == text


def test_check_reports_a_stale_file(tmp_path, monkeypatch, capsys):
    mod = load()
    copies = []
    for path in mod.DOCS:
        copy = tmp_path / path.name
        copy.write_text(path.read_text().replace("| ToMe r=13 | 1.40x |", "| ToMe r=13 | 9.99x |"))
        copies.append(copy)
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    monkeypatch.setattr(mod, "DOCS", tuple(copies))
    assert mod.main(["--check"]) == 1
    assert "results.md" in capsys.readouterr().err
    assert mod.main([]) == 0 and mod.main(["--check"]) == 0
    assert "| ToMe r=13 | 1.40x |" in copies[1].read_text()
