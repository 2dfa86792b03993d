"""The documentation under docs/: every "SPEC §N.M" and "DESIGN" citation in
the repository points at a section that exists there, and the site builds
with MkDocs in strict mode (broken links, anchors and pages left out of the
navigation fail it)."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SPEC = DOCS / "spec.md"
DESIGN = DOCS / "design.md"

# Where citations live: the package, the tests, the benchmark scripts, the
# repository's own documents and configuration, and the docs themselves.
CITING_TREES = ("ravl_pipeline", "tests", "benchmarks", "docs")
CITING_FILES = ("README.md", "BENCHMARKS.md", "Makefile", "params.yaml", "dvc.yaml", "pyproject.toml", "mkdocs.yml")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".json", ".cfg"}

_NUMBER = r"\d+[a-z]?(?:\.\d+)*"
# "SPEC §2.4", "SPEC §1.2." (sentence end), "SPEC §2.2–2.6", "SPEC §3-4", "SPEC §2.2, §2.4, §5"
SPEC_CITATION = re.compile(rf"SPEC §(?P<first>{_NUMBER})(?P<rest>(?:\s*[–-]\s*§?{_NUMBER}|,\s*(?:and\s+)?§{_NUMBER})*)")
_PART = re.compile(rf"(?P<sep>[–-]|,)\s*(?:and\s+)?§?(?P<number>{_NUMBER})")
# "(DESIGN)", "DESIGN.md", "(DESIGN, Dagster and DVC together)", "(DESIGN: Dagster and DVC together)"
DESIGN_CITATION = re.compile(r"\bDESIGN(?:\.md)?\b(?:[,:]\s*(?P<section>[A-Za-z][^).;\n]*))?")
SPEC_HEADING = re.compile(r"^#{1,6}\s+§(?P<number>\S+)(?:\s|$)", re.MULTILINE)
HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*$", re.MULTILINE)


def _range(first: str, last: str) -> list[str]:
    """The sections of a range "2.2–2.6": 2.2, 2.3, …, 2.6 (endpoints only
    when the two do not differ in one integer last component)."""
    a, b = first.split("."), last.split(".")
    if len(b) < len(a):  # "2.2–6" means 2.2–2.6
        b = a[: len(a) - len(b)] + b
    if a[:-1] == b[:-1] and a[-1].isdigit() and b[-1].isdigit() and int(a[-1]) <= int(b[-1]):
        return [".".join(a[:-1] + [str(i)]) for i in range(int(a[-1]), int(b[-1]) + 1)]
    return [first, ".".join(b)]


def spec_citations(text: str) -> list[tuple[int, str]]:
    """(line, section) of every SPEC section the text cites, ranges expanded."""
    out = []
    for m in SPEC_CITATION.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        sections, previous = [m["first"]], m["first"]
        for part in _PART.finditer(m["rest"]):
            if part["sep"] == ",":
                sections.append(part["number"])
            else:
                sections.extend(_range(previous, part["number"])[1:])
            previous = part["number"]
        out.extend((line, s) for s in sections)
    return out


def design_citations(text: str) -> list[tuple[int, str | None]]:
    """(line, section name or None) of every DESIGN citation in the text."""
    return [(text.count("\n", 0, m.start()) + 1, (m["section"] or "").strip() or None)
            for m in DESIGN_CITATION.finditer(text)]


def spec_sections(spec_text: str) -> list[str]:
    return [m["number"].rstrip(".") for m in SPEC_HEADING.finditer(spec_text)]


def headings(text: str) -> set[str]:
    return {m["title"].strip().lower() for m in HEADING.finditer(text)}


def dangling_spec(text: str, sections: set[str]) -> list[tuple[int, str]]:
    return [(line, s) for line, s in spec_citations(text) if s not in sections]


def dangling_design(text: str, design_text: str | None) -> list[tuple[int, str]]:
    """Citations of a missing design page, or of a section it does not have."""
    names = headings(design_text) if design_text is not None else set()
    return [(line, section or "DESIGN") for line, section in design_citations(text)
            if design_text is None or (section is not None and section.lower() not in names)]


def citing_files() -> list[Path]:
    files = [ROOT / name for name in CITING_FILES if (ROOT / name).is_file()]
    for tree in CITING_TREES:
        files += [p for p in sorted((ROOT / tree).rglob("*"))
                  if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    this = Path(__file__).resolve()
    return [p for p in files if p.resolve() != this]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _where(found: dict[Path, list[tuple[int, str]]]) -> str:
    return "\n".join(f"{path.relative_to(ROOT)}:{line}: {what}"
                     for path, rows in found.items() for line, what in rows)


# --- the checker itself can fail ---------------------------------------------------------------------------------

def test_checker_finds_a_dangling_spec_citation():
    sections = {"1", "1.2", "2", "2.2", "2.3", "2.4", "2.5", "2.6", "4b", "5"}
    made_up = "SPEC " + "§9.9"  # built here, so this file itself cites nothing
    assert dangling_spec(f"see {made_up} for details", sections) == [(1, "9.9")]
    assert dangling_spec("as SPEC §1.2. says\n(SPEC §4b) and SPEC §2.2–2.6", sections) == []
    assert dangling_spec("SPEC §2.2–2.8", sections) == [(1, "2.7"), (1, "2.8")]
    assert dangling_spec("x\n(SPEC §2.2, §2.4, §7.1)", sections) == [(2, "7.1")]
    assert dangling_spec("SPEC §1–3", sections) == [(1, "3")]
    assert spec_citations("SPEC §3.3's loss - the spec form") == [(1, "3.3")]


def test_checker_finds_a_dangling_design_citation():
    design = "# Design\n\n## Dagster and DVC together\n"
    assert dangling_design("(DESIGN, Dagster and DVC together)", design) == []
    assert dangling_design("# see DESIGN.md\n(DESIGN)", design) == []
    assert dangling_design("(DESIGN: No such section)", design) == [(1, "No such section")]
    assert dangling_design("(DESIGN)", None) == [(1, "DESIGN")]


# --- the repository ----------------------------------------------------------------------------------------------

def test_spec_headings_carry_their_number_once():
    numbers = spec_sections(_read(SPEC))
    assert numbers, "docs/spec.md has no '## §N' headings"
    assert len(numbers) == len(set(numbers)), f"duplicate section headings: {sorted(numbers)}"


def test_every_spec_citation_has_its_section():
    sections = set(spec_sections(_read(SPEC)))
    found, cited = {}, set()
    for path in citing_files():
        text = _read(path)
        cited.update(s for _, s in spec_citations(text))
        if rows := dangling_spec(text, sections):
            found[path] = [(line, f"SPEC §{s} has no heading in docs/spec.md") for line, s in rows]
    assert not found, "dangling SPEC citations:\n" + _where(found)
    # the scan sees the code's citations (a regex that matched nothing would pass the check above)
    assert {"1.2", "2.1", "2.4", "3.3", "4.2", "5"} <= cited


def test_docs_pages_refer_only_to_existing_sections():
    """Bare "§N.M" in the docs pages (no "SPEC" in front) point at spec.md's headings too."""
    sections = set(spec_sections(_read(SPEC)))
    found = {}
    for path in sorted(DOCS.rglob("*.md")):
        text = _read(path)
        rows = [(text.count("\n", 0, m.start()) + 1, m[1]) for m in re.finditer(rf"§({_NUMBER})", text)]
        if bad := [(line, f"§{s}") for line, s in rows if s not in sections]:
            found[path] = bad
    assert not found, "sections not in docs/spec.md:\n" + _where(found)


def test_every_design_citation_has_its_page_and_section():
    design = _read(DESIGN) if DESIGN.is_file() else None
    found, n = {}, 0
    for path in citing_files():
        text = _read(path)
        n += len(design_citations(text))
        if rows := dangling_design(text, design):
            found[path] = [(line, f"{what}: not a heading of docs/design.md") for line, what in rows]
    assert not found, "dangling DESIGN citations:\n" + _where(found)
    assert n > 0


# --- the site ----------------------------------------------------------------------------------------------------

def test_docs_site_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (it is in the dev extra: pip install -e '.[dev]')")
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    spec_page = site / "spec" / "index.html"
    assert spec_page.is_file()
    assert "§2.4 The spurious criterion" in spec_page.read_text(encoding="utf-8")
    for page in ("index.html", "design/index.html", "pipeline/index.html", "operations/index.html",
                 "api/core/index.html", "repository/index.html", "repository/BENCHMARKS/index.html"):
        assert (site / page).is_file(), page
    # the API pages come from the docstrings
    assert "cluster_regions" in (site / "api" / "core" / "index.html").read_text(encoding="utf-8")
