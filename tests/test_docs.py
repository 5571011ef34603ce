"""The documentation stays consistent with the code (fast: no mkdocs build; `make docs` builds the site).

* ``docs/design.md`` exists, its sections are numbered ``## 1.``, ``## 2.``, ... in order, and every
  citation of the form "docs/design.md section N" (or "sections N and M") in the code, tests, notebooks and
  README names an existing section;
* every ``::: module`` directive of the API reference (``docs/api/*.md``) names a module that imports, and
  every public module of ``certkit`` and ``purifiers`` has such a directive.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
API = ROOT / "docs" / "api"

#: where citations of the design document are looked for
CITING = ("certkit", "purifiers", "benchmarks", "tests", "notebooks", "README.md")
#: "docs/design.md section 3", "``docs/design.md`` sections 2 and 3", "docs/design.md, sections 2, 6 and 10"
CITATION = re.compile(r"docs/design\.md`*,?\s+sections?\s+(\d+(?:\s*(?:,|and)\s*\d+)*)")
SECTION = re.compile(r"^## (\d+)\. \S", re.MULTILINE)
DIRECTIVE = re.compile(r"^::: ([A-Za-z_][\w.]*)\s*$", re.MULTILINE)


def _sections() -> list[int]:
    return [int(n) for n in SECTION.findall(DESIGN.read_text(encoding="utf-8"))]


def _citing_files() -> list[Path]:
    files: list[Path] = []
    for name in CITING:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in sorted(path.rglob("*")) if p.suffix in (".py", ".md", ".ipynb") and p.is_file()
                      and ".ipynb_checkpoints" not in p.parts]
    return files


def _citations() -> list[tuple[str, int, int]]:
    """(file:line, cited section) for every numbered citation of docs/design.md."""
    out = []
    for path in _citing_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in CITATION.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            for number in re.findall(r"\d+", match.group(1)):
                out.append((f"{path.relative_to(ROOT)}:{line}", int(number)))
    return out


def _directives() -> list[str]:
    mods = []
    for page in sorted(API.glob("*.md")):
        mods += DIRECTIVE.findall(page.read_text(encoding="utf-8"))
    return mods


def test_design_document_has_numbered_sections_in_order():
    assert DESIGN.is_file(), "docs/design.md is missing"
    numbers = _sections()
    assert numbers, "docs/design.md has no numbered sections ('## 1. Title')"
    assert numbers == list(range(1, len(numbers) + 1)), f"sections are not numbered 1..N in order: {numbers}"


def test_citation_pattern_reads_the_forms_in_use():
    text = ("see docs/design.md section 3; ``docs/design.md`` sections 6 and 10; "
            "docs/design.md, sections 2, 6 and 10")
    assert [m.group(1) for m in CITATION.finditer(text)] == ["3", "6 and 10", "2, 6 and 10"]


def test_every_cited_section_exists():
    existing = set(_sections())
    citations = _citations()
    assert citations, "no code cites docs/design.md by section number"
    missing = [f"{where}: section {n}" for where, n in citations if n not in existing]
    assert not missing, "citations of docs/design.md sections that do not exist:\n" + "\n".join(missing)


def test_api_pages_exist_and_have_directives():
    assert (ROOT / "mkdocs.yml").is_file()
    pages = sorted(API.glob("*.md"))
    assert pages, "docs/api/*.md is missing"
    empty = [p.name for p in pages if p.name != "index.md" and not DIRECTIVE.search(p.read_text(encoding="utf-8"))]
    assert not empty, f"API pages without a '::: module' directive: {empty}"


@pytest.mark.parametrize("module", _directives())
def test_api_directive_imports(module):
    importlib.import_module(module)


def test_every_public_module_is_in_the_api_reference():
    documented = set(_directives())
    public = []
    for top in ("certkit", "purifiers"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if any(p.startswith("_") for p in parts) or parts[-1] == "__main__":
                continue
            public.append(".".join(parts))
    # a package's own page entry is optional when its modules are documented one by one
    missing = [m for m in public if m not in documented and not any(d.startswith(m + ".") for d in documented)]
    assert not missing, "public modules missing from docs/api/*.md (add a '::: module' line): " + ", ".join(missing)
