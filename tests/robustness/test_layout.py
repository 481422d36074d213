"""The lesson stays short: the reading path (the method and its plain path) within its line budget, every
line of it at most 100 characters, and no two modules importing each other around a loop, so that whatever
moved to extras/ is one import away and nothing reaches back."""
import sys
import textwrap

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from tools import reading_path as rp  # noqa: E402


def test_the_reading_path_fits_its_budget():
    """Catches code growing back into the top-level files: at most 2,400 lines together, 450 each."""
    sizes = {f: len(rp.lines(ROOT / f)) for f in (*rp.READING_ORDER, rp.DEMO)}
    assert sum(sizes[f] for f in rp.READING_ORDER) <= rp.MAX_TOTAL, sizes
    assert max(sizes.values()) <= rp.MAX_FILE, sizes


def test_every_line_of_the_reading_path_fits_100_characters():
    wide = {f: rp.wide_lines(ROOT / f) for f in (*rp.READING_ORDER, rp.DEMO)}
    assert not {f: n for f, n in wide.items() if n}, "lines over 100 characters"


def test_no_import_cycle():
    assert rp.import_cycles() == []


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path, monkeypatch):
    """The check itself can fail: two modules importing each other, one of them inside a function, is a loop;
    an import under `if __name__ == "__main__":` is not."""
    (tmp_path / "extras").mkdir()
    (tmp_path / "tools").mkdir()
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text(textwrap.dedent("""
        def f():
            from a import x
    """))
    (tmp_path / "c.py").write_text("import a\nif __name__ == '__main__':\n    import c2\n")
    (tmp_path / "c2.py").write_text("import c\n")
    monkeypatch.setattr(rp, "ROOT", tmp_path)
    cycles = rp.import_cycles()
    assert [sorted(set(c)) for c in cycles] == [["a", "b"]]


def test_the_readme_gives_the_reading_path_as_it_is():
    """README.md's reading order names each file with its line count, as tools/reading_path.py
    counts it: catches a figure left behind when a file grows or shrinks."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for f in rp.READING_ORDER:
        n = len(rp.lines(ROOT / f))
        assert f"`{f}` ({n}" in readme, f"README.md: `{f}` should show {n} lines"
    total = sum(len(rp.lines(ROOT / f)) for f in rp.READING_ORDER)
    assert f"{total:,} lines in all" in readme


def test_the_readme_gives_the_size_of_extras_and_tools_as_they_are():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for package in ("extras", "tools"):
        files = sorted((ROOT / package).glob("*.py"))
        n = sum(len(rp.lines(p)) for p in files)
        assert f"`{package}/` ({len(files)} files, {n:,} lines)" in readme, package
