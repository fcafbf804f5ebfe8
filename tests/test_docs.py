"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one page run in order in one namespace, in a fresh working directory, so a page can
build on its earlier blocks. A block that cannot run here says so on the line before it, as an HTML
comment the rendered page hides: ``<!-- not run: why -->`` (a fragment that shows a signature, a
placeholder for the reader's own model or data, a GPU-only step). The reason must be given.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"(?:^<!--\s*not run:(?P<why>[^>]*)-->\s*\n)?^```python\n(?P<code>.*?)^```", re.M | re.S)


def blocks(page: Path) -> list[tuple[str | None, str, int]]:
    """``(why not run or None, code, line)`` of every python block of ``page``."""
    text = page.read_text()
    return [(m.group("why"), m.group("code"), text.count("\n", 0, m.start("code")) + 1)
            for m in _BLOCK.finditer(text)]


def test_every_block_runs_or_says_why_not():
    for page in PAGES:
        for why, _, line in blocks(page):
            assert why is None or why.strip(), f"{page.name}:{line}: '<!-- not run: -->' needs a reason"
    assert sum(why is None for page in PAGES for why, _, _ in blocks(page)) >= 6


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if any(why is None for why, _, _ in blocks(p))],
                         ids=lambda p: p.name)
def test_page_code_runs(page, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for why, code, line in blocks(page):
        if why is not None:
            continue
        exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)
