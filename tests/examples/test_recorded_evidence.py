"""The recorded evidence under docs/evidence: every verdict follows the declared rule from the recorded numbers,
docs/results.md shows the tables written from them, and (under ``-m slow``) a rerun of seed 0 with the recorded
command and thread count gives the recorded numbers again."""

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_examples import EXAMPLES

sys.path.insert(0, str(EXAMPLES))
sys.path.insert(0, str(EXAMPLES / "studies"))
import evidence_tables
from emascale_examples.paired import verdict

ROOT = Path(__file__).parents[2]
EVIDENCE = ROOT / "docs" / "evidence"
RECORDED = sorted(path.parent for path in EVIDENCE.glob("*/*/results.json"))
#: The studies whose tables docs/results.md shows as evidence_tables.py writes them.
TABULATED = sorted(path.parent for path in EVIDENCE.glob("fashion-mnist/*/results.json"))


def _name(folder: Path) -> str:
    return str(folder.relative_to(EVIDENCE))


def _gap_summaries(node):
    """Every paired-gap summary (a dict with a verdict) in a results tree."""
    if isinstance(node, dict):
        if "verdict" in node and "over_floor" in node:
            yield node
        for value in node.values():
            yield from _gap_summaries(value)
    elif isinstance(node, list):
        for value in node:
            yield from _gap_summaries(value)


def test_the_fashion_mnist_studies_are_recorded():
    assert {_name(folder) for folder in TABULATED} >= {
        "fashion-mnist/polyak", "fashion-mnist/pseudo-label", "fashion-mnist/byol", "fashion-mnist/dino"
    }  # fmt: skip


@pytest.mark.parametrize("folder", RECORDED, ids=_name)
def test_recorded_verdicts_follow_the_declared_rule(folder):
    result = json.loads((folder / "results.json").read_text())
    environment = result["environment"]
    assert environment["torch"] and environment["torch_threads"] >= 1 and environment["command"].startswith("python ")
    summaries = list(_gap_summaries(result["summary"]))
    assert summaries, "no verdicts recorded"
    for gap in summaries:
        floor = gap["mean"] / gap["over_floor"] if gap["over_floor"] not in (0, math.inf) else None
        if floor is not None:
            assert gap["verdict"] == verdict(gap["mean"], floor)
        if "over_floor_range" in gap:  # the verdict against each end of F's per-seed range
            low, high = gap["over_floor_range"]
            ends = [verdict(gap["mean"], gap["mean"] / r) if r not in (0, math.inf) else None for r in (low, high)]
            robust = all(end in (None, gap["verdict"]) for end in ends)
            assert gap["robust"] == robust


@pytest.mark.parametrize("folder", TABULATED, ids=_name)
def test_results_md_shows_the_tables_written_from_the_recorded_results(folder):
    page = (ROOT / "docs" / "results.md").read_text()
    for part in evidence_tables.table(folder).split("\n\n"):
        assert part in page, f"docs/results.md lacks this part of {_name(folder)}'s tables:\n{part}"
    figures = list(folder.glob("*.png"))
    assert figures and all(f"evidence/{_name(folder)}/{figure.name}" in page for figure in figures)


def test_results_md_shows_the_summary_written_from_the_recorded_results():
    folders = [EVIDENCE / "fashion-mnist" / name for name in ("polyak", "pseudo-label", "byol", "dino")]
    assert evidence_tables.summary(folders) in (ROOT / "docs" / "results.md").read_text()


def _rerun_seed_zero(folder: Path, tmp_path: Path) -> dict:
    """The recorded command again, for seed 0 only where the study has seeds, with the recorded thread count."""
    recorded = json.loads((folder / "results.json").read_text())
    command = shlex.split(recorded["environment"]["command"])[1:]
    script = ROOT / command[0]
    args = [arg for arg in command[1:] if arg != "--pilot"]
    for option in ("--out-dir", "--seeds"):
        if option in args:
            del args[args.index(option) : args.index(option) + 2]
    if "seeds" in recorded["args"]:
        args += ["--seeds", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": str(recorded["environment"]["torch_threads"])}
    subprocess.run([sys.executable, str(script), *args, "--out-dir", str(tmp_path)], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=3600)  # fmt: skip
    return recorded, json.loads((tmp_path / "results.json").read_text())


def _same(recorded, rerun, where: str) -> None:
    if isinstance(recorded, dict):
        assert set(recorded) == set(rerun), where
        for key in recorded:
            if key != "seconds":  # wall-clock time: the one thing a rerun does not repeat
                _same(recorded[key], rerun[key], f"{where}.{key}")
    elif isinstance(recorded, list):
        assert len(recorded) == len(rerun), where
        for index, (a, b) in enumerate(zip(recorded, rerun)):
            _same(a, b, f"{where}[{index}]")
    else:
        assert recorded == rerun, f"{where}: recorded {recorded}, rerun {rerun}"


@pytest.mark.slow
@pytest.mark.parametrize("folder", RECORDED, ids=_name)
def test_a_rerun_repeats_the_recorded_numbers(folder, tmp_path):
    """Bit for bit on the machine of docs/results.md (a 2-core x86-64 CPU) with the recorded thread count: seed 0 of
    a paired study (its runs do not depend on the other seeds), or the whole single-seed study."""
    recorded, rerun = _rerun_seed_zero(folder, tmp_path)
    runs = [run for run in recorded["runs"] if run.get("seed", 0) == 0]
    assert runs
    _same(runs, rerun["runs"][: len(runs)], "runs")
