"""The documentation: the generated config reference is current, the README stays short, no link is broken."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from prefpretrain import config_docs

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)


def _prose(text: str) -> str:
    """The page without fenced code blocks and inline code (whose brackets are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _links(page: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(page.read_text(encoding="utf-8")))
            if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, https:, mailto: ... are not ours


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_configuration_page_is_current():
    page = ROOT / "docs" / "configuration.md"
    if not (page.is_file() and page.read_text(encoding="utf-8") == config_docs.render()):
        pytest.fail(f"docs/configuration.md is not current: run `{config_docs.REGENERATE}`", pytrace=False)


def test_check_flag_says_whether_the_page_is_current(tmp_path, capsys):
    page = tmp_path / "configuration.md"
    page.write_text(config_docs.render(), encoding="utf-8")
    assert config_docs.main(["--check", str(page)]) == 0
    page.write_text("stale\n", encoding="utf-8")
    assert config_docs.main(["--check", str(page)]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_every_config_field_has_a_description():
    rows = [line for line in config_docs.render().splitlines() if line.startswith("| `")]
    bare = [line.split("`")[1] for line in rows if line.rstrip().endswith("|  |")]
    assert rows and not bare, f"config fields without a trailing # comment (their documentation): {', '.join(bare)}"


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= 300, f"README.md has {n} lines (at most 300): move details into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no such heading in {dest.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {', '.join(broken)}"
