"""The README's result tables are the committed JSON, rendered by one script."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "readme_tables.py"


def load():
    spec = importlib.util.spec_from_file_location("readme_tables", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_tables_match_the_committed_json():
    mod = load()
    text = mod.README.read_text()
    assert mod.render(text) == text, "run python benchmarks/readme_tables.py"
    assert text.count("<!-- table:") == len(mod.TABLES)


def test_an_edited_number_is_put_back():
    mod = load()
    text = mod.README.read_text()
    edited = text.replace("| ToMe r=13 | 1.40x |", "| ToMe r=13 | 9.99x |")
    assert edited != text and mod.render(edited) == text


def test_a_new_empty_table_is_filled_and_swallows_nothing():
    mod = load()
    text = mod.README.read_text()
    start = text.index("<!-- table:dinov2_224 -->")
    end = text.index("<!-- /table -->", start)
    emptied = text[:start] + "<!-- table:dinov2_224 -->\n" + text[end:]
    assert emptied != text and mod.render(emptied) == text
