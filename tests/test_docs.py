"""The README and docs/: every `mmcurate …` command line parses with the real click commands,
and every relative link (with its #anchor) resolves."""

from __future__ import annotations

import re
import shlex
import unicodedata
from pathlib import Path

import click
import pytest

from mmcurate.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/RESULTS.md"]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE = re.compile(r"`(mmcurate [^`]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _code_lines(text: str) -> list[str]:
    """Logical lines of fenced and indented code blocks, backslash continuations joined."""
    blocks = [m.group(0) for m in FENCE.finditer(text)]
    outside = FENCE.sub("", text)
    indented, run = [], []
    for line in outside.splitlines():
        if line.startswith("    ") and line.strip():
            run.append(line)
        elif run:
            indented.append("\n".join(run))
            run = []
    if run:
        indented.append("\n".join(run))
    logical = []
    for block in blocks + indented:
        joined = re.sub(r"\\\n\s*", " ", block)
        logical += [" ".join(line.split()).removeprefix("$ ") for line in joined.splitlines()]
    return logical


def command_lines(text: str) -> list[str]:
    """Every `mmcurate …` invocation a page shows, in code blocks or inline code."""
    found = [line for line in _code_lines(text) if line.startswith("mmcurate ")]
    found += [" ".join(m.group(1).split()) for m in INLINE.finditer(FENCE.sub("", text))]
    return found


def parse_command(line: str) -> None:
    """Parse one command line with the real click command, without running or converting it."""
    args = shlex.split(line, comments=True)[1:]
    if not args or args[0].startswith("-"):
        return
    group_ctx = click.Context(cli, info_name="mmcurate")
    command = cli.get_command(group_ctx, args[0])
    if command is None:
        raise click.UsageError(f"no such command {args[0]!r}")
    ctx = click.Context(command, info_name=args[0], parent=group_ctx)
    command.make_parser(ctx).parse_args(args[1:])


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in ("L", "N"))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The heading anchors of a markdown page (headings inside code blocks do not count)."""
    text = FENCE.sub("", page.read_text())
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def test_pages_exist():
    assert len(PAGES) >= 9 and all(p.exists() for p in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_line_parses(page):
    lines = command_lines(page.read_text())
    bad = []
    for line in lines:
        try:
            parse_command(line)
        except click.ClickException as exc:
            bad.append(f"{line!r}: {exc.format_message()}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    bad = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not bad, "\n".join(bad)


def test_the_checks_catch_what_they_look_for(tmp_path):
    with pytest.raises(click.ClickException):
        parse_command("mmcurate select scores/ --out s.npy --no-such-flag")
    with pytest.raises(click.ClickException):
        parse_command("mmcurate nosuchcommand --out x")
    text = (
        "Run\n\n    mmcurate score S --out O \\\n        --metric negclip\n\nand `mmcurate demo`."
    )
    assert command_lines(text) == ["mmcurate score S --out O --metric negclip", "mmcurate demo"]
    assert github_anchor("Reshard output in img2dataset's layout (`x`)") == (
        "reshard-output-in-img2datasets-layout-x"
    )
