"""The README stays short and every relative link of the README and docs/*.md leads somewhere: the file exists and,
for a link with ``#anchor``, the file has a heading with that GitHub anchor."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, backticks and punctuation dropped (not ``-`` or ``_``), spaces to
    hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of ``page``, with GitHub's ``-1``, ``-2`` suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        if match := re.match(r"#{1,6} (.+)", line):
            base = anchor(match.group(1))
            out.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return out


def links(page: Path) -> list[str]:
    """The relative link targets of ``page`` (outside code blocks; web and mail links left out)."""
    found = [a or b for a, b in LINK.findall(FENCE.sub("", page.read_text()))]
    return [t for t in found if not re.match(r"[a-z]+:", t)]


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines < 200, f"README.md has {lines} lines: move detail to a page under docs/"


def test_the_topic_pages_exist_and_are_linked():
    readme = links(ROOT / "README.md")
    for name in ("decoding", "alignment", "scaling", "reliability", "configuration", "ARCHITECTURE"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), name
        assert any(t.split("#")[0] == f"docs/{name}.md" for t in readme), f"README does not link docs/{name}.md"


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` that lead nowhere, each with why."""
    broken = []
    for target in links(page):
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{frag} in {dest.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path):
    broken = broken_links(page)
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_a_broken_link_or_anchor_is_found(tmp_path: Path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading (here)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n[ok](other.md#a-code-heading-here) [self](#page) [web](https://example.org/x.md)\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere) ![img](missing.png)\n"
        "```\n[in code](not-checked.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#nowhere: no heading with anchor #nowhere in other.md",
        "missing.png: no such file",
    ]


def test_anchor_matches_github():
    assert anchor("Pipelines (`python -m atspeed pipeline FILE`)") == "pipelines-python--m-atspeed-pipeline-file"
    assert anchor("The whole pipeline (quick start, README command 1)") == (
        "the-whole-pipeline-quick-start-readme-command-1"
    )
    assert anchor("ZeRO-3 loading memory") == "zero-3-loading-memory"
