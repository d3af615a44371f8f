"""The documentation: the site builds with no warning, every public name has a reference entry, every argument of
every public callable is documented, and every Python block of the README and the site runs (or says why not)."""

from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_emascale

ROOT = Path(__file__).parents[2]
DOCS = ROOT / "docs"
NOT_RUN = re.compile(r"<!-- not run: (?P<reason>[^>]+?) -->\s*$")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)]


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """Every ```python block of a Markdown file: (line, code, the reason it is not run, or None)."""
    lines = path.read_text().splitlines()
    blocks = []
    for index, line in enumerate(lines):
        if line.strip() != "```python":
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
        before = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        marker = NOT_RUN.search(before)
        blocks.append((index + 1, "\n".join(lines[index + 1 : end]), marker["reason"] if marker else None))
    return blocks


BLOCKS = [
    pytest.param(code, reason, id=f"{path.relative_to(ROOT)}:{line}")
    for path in markdown_files()
    for line, code, reason in python_blocks(path)
]


@pytest.mark.parametrize(("code", "reason"), BLOCKS)
def test_every_python_block_runs_or_says_why_not(code, reason, tmp_path):
    if reason is not None:
        assert len(reason.split()) >= 3, "say why the block is not run"
        compile(code, "<block>", "exec")  # it is Python all the same
        return
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )  # a fresh interpreter, as a reader's would be
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_blocks_are_found():
    runnable = [param for param in BLOCKS if param.values[1] is None]
    assert len(BLOCKS) >= 10 and len(runnable) >= 4  # the README's plain loop, getting started, the teachers, ...


def test_every_public_name_has_a_reference_entry():
    api = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"\.\. auto(?:class|function):: lightning_emascale\.(\w+)", api))
    assert set(lightning_emascale.__all__) - documented == set()
    assert documented - set(lightning_emascale.__all__) == set()


def documented_arguments(doc: str) -> set[str]:
    """The argument names of a Google-style docstring's ``Args:`` section."""
    match = re.search(r"^Args:\n(?P<body>(?:(?: {4}.*)?\n)+)", doc, flags=re.MULTILINE)
    if match is None:
        return set()
    return set(re.findall(r"^ {4}(\w+)(?: \([^)]*\))?:", match["body"], flags=re.MULTILINE))


def public_callables() -> list[tuple[str, object]]:
    found = []
    for name in lightning_emascale.__all__:
        obj = getattr(lightning_emascale, name)
        if inspect.isclass(obj) and obj.__init__ is object.__init__:
            continue
        found.append((name, obj))
    return found


@pytest.mark.parametrize(("name", "obj"), public_callables(), ids=[name for name, _ in public_callables()])
def test_every_argument_of_a_public_callable_is_documented(name, obj):
    target = obj.__init__ if inspect.isclass(obj) else obj
    parameters = [
        p.name
        for p in inspect.signature(target).parameters.values()
        if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    documented = documented_arguments(inspect.getdoc(obj) or "")
    if inspect.isclass(obj):
        documented |= documented_arguments(inspect.getdoc(obj.__init__) or "")
    assert set(parameters) - documented == set(), f"{name}: undocumented arguments"
    assert documented - set(parameters) == set(), f"{name}: documented arguments it does not take"


@pytest.mark.skipif(importlib.util.find_spec("sphinx") is None, reason="Sphinx is not installed (`docs` extra)")
def test_the_site_builds_without_a_warning(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path / "html")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    pages = {path.relative_to(tmp_path / "html").as_posix() for path in (tmp_path / "html").rglob("*.html")}
    assert {"index.html", "getting-started.html", "api.html", "guides/deepspeed.html", "migration.html"} <= pages
    api = (tmp_path / "html" / "api.html").read_text()
    for name in lightning_emascale.__all__:  # each public name rendered with its own anchor
        assert f'id="lightning_emascale.{name}"' in api, name
