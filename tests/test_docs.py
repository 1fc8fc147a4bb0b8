"""The docs in the repository: links resolve in a fresh clone, commands shown exist, config fields documented."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "src" / "freezeasguard" / "zoo" / "embedded" / "MODEL_CARD.md"]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_anchor(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_resolves(doc):
    assert doc.is_file(), doc
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists() or not path.is_relative_to(ROOT):
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(target)
    assert not broken, f"{doc.name}: {broken}"


def test_readme_links_the_docs():
    links = set(LINK.findall((ROOT / "README.md").read_text()))
    assert {"docs/benchmark.md", "docs/method.md", "docs/cli.md", "docs/results.md"} <= links


def test_no_reference_to_files_outside_the_repository():
    # The specs the project started from lived outside the repository; everything cites docs/ now.
    outside = ("BENCHMARK" + ".md", "METHOD" + ".md")
    files = [p for d in ("src", "tests", "benchmarks", "docs") for p in (ROOT / d).rglob("*")
             if p.suffix in (".py", ".md", ".txt", ".json", ".toml") and p.is_file()]
    hits = [f"{p.relative_to(ROOT)}: {name}" for p in [*files, ROOT / "README.md"]
            for name in outside if name in p.read_text(errors="replace")]
    assert not hits, hits


def _shown_commands():
    """(doc, command line) for every `freezeasguard ...` command the docs show, in code blocks or inline."""
    for doc in DOCS:
        text = doc.read_text()
        for match in re.finditer(r"(?:^|`|&& )(freezeasguard [^`\n#&]*)", text, flags=re.M):
            yield doc.name, match.group(1).strip()


def test_commands_shown_in_the_docs_exist_with_their_options():
    from test_cli import _commands, _options

    commands = _commands()
    checked = 0
    for doc, line in _shown_commands():
        words = line.split()[1:]
        name = " ".join(words[:2]) if " ".join(words[:2]) in commands else words[0] if words else ""
        if name not in commands:
            continue  # prose such as "freezeasguard implements ..."
        options = _options(commands[name])
        unknown = [w.split("=")[0] for w in words if w.startswith("--") and w.split("=")[0] not in options
                   and w != "--help"]
        assert not unknown, f"{doc}: `{line}` uses {unknown}, not options of `{name}`"
        checked += 1
    assert checked >= 10


def test_cli_doc_lists_every_config_field():
    from freezeasguard.attacks import AttackConfig
    from freezeasguard.bench.profiles import BenchProfile
    from freezeasguard.finetuning import FinetuneConfig
    from freezeasguard.learn import LearnConfig
    from freezeasguard.protections.immunise import ImmuniseConfig
    from freezeasguard.service.config import ServiceConfig
    from freezeasguard.training import TrainConfig

    text = (ROOT / "docs" / "cli.md").read_text()
    missing = [f"{cls.__name__}.{f.name}" for cls in (LearnConfig, ImmuniseConfig, FinetuneConfig, TrainConfig, ServiceConfig, AttackConfig, BenchProfile)
               for f in dataclasses.fields(cls) if f"`{f.name}`" not in text]
    assert not missing, missing


def _cli_table(heading_text: str) -> list[list[str]]:
    """The rows (cells stripped) of the first Markdown table after the line containing `heading_text` in
    docs/cli.md."""
    lines = (ROOT / "docs" / "cli.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if heading_text in line)
    rows = []
    for line in lines[start + 1:]:
        stripped = line.strip()
        if not stripped.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in stripped.strip("|").split("|")]
        if set("".join(cells)) <= set("-: "):
            continue
        rows.append(cells)
    return rows[1:]  # without the header


def test_cli_doc_shared_options_table_is_the_code_s():
    """docs/cli.md's table of shared options lists exactly the rows of `cli.options.SHARED_OPTIONS`, each with
    exactly its commands (a command group's members may be written 'guard random/top')."""
    from freezeasguard.cli.options import ALL_COMMANDS, SHARED_OPTIONS

    documented: dict[str, set[str] | str] = {}
    for option_cell, _meaning, commands_cell in _cli_table("One option, one meaning"):
        options = re.findall(r"`(--[\w-]+)`", option_cell)
        if "every command" in commands_cell:
            names: set[str] | str = ALL_COMMANDS
        else:
            names = set()
            for part in (p.strip() for p in commands_cell.split(",")):
                head, _, rest = part.partition(" ")
                if rest and "/" in rest:  # "guard random/top/names"
                    names |= {f"{head} {sub}" for sub in rest.split("/")}
                else:
                    names.add(part)
        for opt in options:
            documented[opt] = names
    assert documented == SHARED_OPTIONS
