"""The README stays short, the docs' links land, and the README's tour names real verbs.

Links are checked as GitHub renders them: relative targets resolve against the page's folder,
and a `#fragment` must be the slug of a heading in the target page (lower case, punctuation
dropped, spaces to hyphens, `-1`, `-2`... for repeats). Code blocks and code spans are not
markdown, so neither their `[x](y)` nor their `# comments` count.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from minigpt.cli import build_parser

from conftest import REPO

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 300

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def split_code(text: str) -> tuple[list[str], list[str]]:
    """(prose lines with code spans blanked, code: fenced blocks and code spans)."""
    prose, code, fence = [], [], None
    for line in text.splitlines():
        match, stripped = FENCE.match(line), line.strip()
        if fence is None and match:
            fence = match.group(1)
            prose.append("")
        elif fence is not None:
            if set(stripped) == {fence[0]} and len(stripped) >= len(fence):
                fence = None
            else:
                code.append(line)
            prose.append("")
        else:
            code.extend(m.group(2) for m in CODE_SPAN.finditer(line))
            # a heading keeps its code's text (it is part of the slug); elsewhere code is no link
            keep = HEADING.match(line) is not None
            prose.append(CODE_SPAN.sub(lambda m, keep=keep: m.group(2) if keep else "", line))
    return prose, code


def slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in split_code(page.read_text(encoding="utf-8"))[0]:
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def relative_links(page: Path) -> list[str]:
    prose = split_code(page.read_text(encoding="utf-8"))[0]
    targets = [m.group(1) for line in prose for m in LINK.finditer(line)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def test_readme_is_short() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_heading_inside_code_is_not_an_anchor() -> None:
    assert slug("On a GPU: `bench/gpu_check.sh`") == "on-a-gpu-benchgpu_checksh"
    assert slug("Which `--dtype`") == "which---dtype"
    assert slug("Prepare data: `minigpt prepare`") == "prepare-data-minigpt-prepare"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def cli_verbs() -> dict[str, set[str]]:
    """Each verb of `minigpt` and the names of its own sub-verbs (empty when it has none)."""

    def choices(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    return {verb: set(choices(sub)) for verb, sub in choices(build_parser()).items()}


def readme_tour() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## A tour of the verbs\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README.md has no '## A tour of the verbs' section"
    return match.group(1)


def test_readme_tour_names_real_verbs() -> None:
    verbs = cli_verbs()
    code = "\n".join(split_code(readme_tour())[1])
    # `minigpt VERB [SUB]`; a path after the verb (configs/x.toml, runs/demo) is no sub-verb
    named = re.findall(r"\bminigpt ([a-z][\w-]*)(?: ([a-z][\w-]*)\b(?![/.]))?", code)
    assert named, "the README's tour names no `minigpt <verb>` in code"
    unknown = sorted(
        " ".join(filter(None, (verb, sub)))
        for verb, sub in named
        if verb not in verbs or (sub and verbs[verb] and sub not in verbs[verb])
    )
    assert not unknown, f"the README's tour names verbs the CLI does not have: {unknown}"


def test_configs_page_lists_every_section_and_key_of_the_run_config() -> None:
    from dataclasses import fields

    from minigpt.config import RunConfig

    text = (REPO / "docs" / "configs.md").read_text(encoding="utf-8")
    sections = [f.name for f in fields(RunConfig)]
    numbers = {5: "five", 6: "six", 7: "seven", 8: "eight"}
    assert f"A config has {numbers[len(sections)]} sections" in text
    for section in sections:
        match = re.search(rf"^## `\[{section}\]`\n(.*?)(?=^## |\Z)", text, re.S | re.M)
        assert match, f"docs/configs.md has no `[{section}]` section"
        documented = set(
            re.findall(r"`([a-z_]+)`", " ".join(re.findall(r"^\| ([^|]+)\|", match.group(1), re.M)))
        )
        keys = {f.name for f in fields(getattr(RunConfig(), section))}
        assert keys <= documented | {"task"}, (
            f"[{section}] keys not documented: {keys - documented}"
        )
