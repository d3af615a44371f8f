"""Post-hoc snapshots belong to one run: the run id a snapshot and a state carry, the refusal of a snapshot directory
that holds another run's (before anything moves), what ``reconstruct_post_hoc`` refuses, and how a file is written."""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch

import lightning_emascale.post_hoc as post_hoc
from lightning_emascale import ScaledEMA, reconstruct_post_hoc
from lightning_emascale.post_hoc import write_snapshot

SIGMA_RELS = (0.05, 0.10)
FIRST = "post_hoc-000000000000032.pt"


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))


def build(directory, sigma_rels=SIGMA_RELS, hooked=True):
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ema = ScaledEMA(
        model, optimizer if hooked else None, sigma_rels=sigma_rels, snapshot_every_samples=32,
        snapshot_dir=directory, base_batch_size=4,
    )  # fmt: skip
    return model, optimizer, ema


def backward(model, ema, batch=8, seed=1):
    """The forward and backward passes of a micro-batch of ``batch`` samples, counted."""
    x = torch.randn(batch, 3, generator=torch.Generator().manual_seed(seed))
    model(x).pow(2).mean().backward()
    ema.count_samples(batch)


def optimizer_step(optimizer, ema, hooked=True):
    """The optimizer step (``hooked=False``: the EMA is told by hand, ``end_step()``)."""
    optimizer.step()
    optimizer.zero_grad()
    if not hooked:
        ema.end_step()


def step(model, optimizer, ema, batch=8, seed=1):
    backward(model, ema, batch, seed)
    optimizer_step(optimizer, ema)


def run(directory, steps=8, batch=8, sigma_rels=SIGMA_RELS):
    """A post-hoc run of ``steps`` steps of ``batch`` samples: snapshots every 32 samples into ``directory``."""
    model, optimizer, ema = build(directory, sigma_rels)
    for index in range(steps):
        step(model, optimizer, ema, batch, seed=index)
    return model, optimizer, ema


def files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def state_of(model, ema) -> dict:
    """The weights, the clock and the power EMAs, copied."""
    return {
        "weights": {name: value.clone() for name, value in model.state_dict().items()},
        "clock": (ema.samples_seen, ema.optimizer_steps, ema.ema_updates),
        "emas": [{k: v.clone() for k, v in s.averages_by_name().items()} for s in ema.averager.states],
    }


def assert_unchanged(before: dict, after: dict, weights: bool = True) -> None:
    assert before["clock"] == after["clock"]
    for old, new in zip(before["emas"], after["emas"]):
        assert all(torch.equal(old[name], new[name]) for name in old)
    if weights:
        assert all(torch.equal(value, after["weights"][name]) for name, value in before["weights"].items())


def rewrite(path: Path, change) -> None:
    """Load a snapshot, ``change`` it in place (its averages are copies) and save it again under ``path``."""
    snapshot = torch.load(path, weights_only=True)
    snapshot["averages"] = [dict(averages) for averages in snapshot["averages"]]
    change(snapshot)
    torch.save(snapshot, path)


def strip_run_ids(directory: Path) -> None:
    """Make the snapshots in ``directory`` look written before run ids."""
    for path in directory.glob("post_hoc-*.pt"):
        rewrite(path, lambda snapshot: snapshot.pop("run_id"))


# ------------------------------------------------------------------------------------------------- the run id
def test_each_run_has_an_id_that_its_snapshots_and_state_carry(tmp_path):
    _, _, ema = run(tmp_path, sigma_rels=(0.10, 0.05))  # lengths given in descending order
    run_id = ema.averager.run_id
    assert isinstance(run_id, str) and re.fullmatch(r"[0-9a-f]{32}", run_id)
    assert ema.state_dict()["run_id"] == run_id
    assert run_id != build(tmp_path / "other")[2].averager.run_id  # every run its own
    snapshot = torch.load(tmp_path / FIRST, weights_only=True)
    assert snapshot["run_id"] == run_id
    # written in ascending sigma_rel, each EMA beside its own label
    assert snapshot["sigma_rels"] == [0.05, 0.10]
    last = torch.load(tmp_path / "post_hoc-000000000000064.pt", weights_only=True)
    for index in (0, 1):
        tracked = ema.averager.states[1 - index].averages_by_name()
        assert all(torch.equal(last["averages"][index][name], tracked[name]) for name in tracked)
    rebuilt = reconstruct_post_hoc(tmp_path, sigma_rel=0.05)
    for name, value in ema.averager.states[1].averages_by_name().items():
        torch.testing.assert_close(rebuilt[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_saved_run_id_that_is_no_str_is_refused_before_anything_loads(tmp_path):
    _, _, saved = run(tmp_path / "a", steps=2)
    model, _, ema = build(tmp_path / "b")
    before = state_of(model, ema)
    for bad in (5, ""):
        with pytest.raises(ValueError, match=rf"The saved post-hoc EMA state has run_id={bad!r}; a non-empty str"):
            ema.load_state_dict({**saved.state_dict(), "run_id": bad})
    assert_unchanged(before, state_of(model, ema))


# ------------------------------------------------------------------------------ a directory of another run
@pytest.mark.parametrize("hooked", [True, False], ids=["optimizer-hook", "end_step"])
def test_a_snapshot_dir_of_another_run_is_refused_before_the_first_step_moves_anything(tmp_path, hooked):
    _, _, other = run(tmp_path)  # snapshots at 32 and 64 samples
    written = files(tmp_path)
    model, optimizer, ema = build(tmp_path, hooked=hooked)
    backward(model, ema)
    before = state_of(model, ema)
    message = (
        rf"`snapshot_dir`='{re.escape(os.fspath(tmp_path))}' holds post-hoc snapshots of another run: {FIRST}"
        rf" \(run {other.averager.run_id}; this run: run {ema.averager.run_id}\)\. Its snapshots would mix with"
        r" them, and `reconstruct_post_hoc` would combine both runs\. Give this run a new `snapshot_dir` \(or move"
        r" the other run's snapshots out\), or resume the run that wrote them from its own checkpoint"
    )
    with pytest.raises(ValueError, match=message):
        optimizer_step(optimizer, ema, hooked=hooked)
    # with the optimizer hooked, refused before the step; by hand (end_step), after the user's own step only
    assert_unchanged(before, state_of(model, ema), weights=hooked)
    assert files(tmp_path) == written


def test_a_resumed_run_keeps_its_id_and_writes_on_into_its_own_directory(tmp_path):
    model, optimizer, first = run(tmp_path, steps=5)  # 40 samples: a snapshot at 32
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": first.state_dict()}
    model, optimizer, resumed = build(tmp_path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["ema"])
    assert resumed.averager.run_id == first.averager.run_id
    for index in range(4):  # to 72 samples: a snapshot at 64
        step(model, optimizer, resumed, seed=index)
    snapshots = [torch.load(path, weights_only=True) for path in sorted(tmp_path.iterdir())]
    assert [s["samples"] for s in snapshots] == [32, 64]
    assert {s["run_id"] for s in snapshots} == {first.averager.run_id}


def test_a_resumed_run_refuses_the_directory_of_another_run(tmp_path):
    model, optimizer, mine = run(tmp_path / "mine", steps=5)
    _, _, other = run(tmp_path / "other", steps=5)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": mine.state_dict()}
    written = files(tmp_path / "other")
    model, optimizer, resumed = build(tmp_path / "other")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["ema"])
    backward(model, resumed)
    before = state_of(model, resumed)
    with pytest.raises(
        ValueError, match=rf"{FIRST} \(run {other.averager.run_id}; this run: run {mine.averager.run_id}\)\."
    ):
        optimizer_step(optimizer, resumed)
    assert_unchanged(before, state_of(model, resumed))
    assert files(tmp_path / "other") == written


def test_a_snapshot_of_another_run_that_appears_mid_run_refuses_the_next_write_before_the_step(tmp_path):
    model, optimizer, ema = run(tmp_path, steps=3)  # 24 samples: no snapshot yet, the directory was checked
    intruder = {name: value.clone() for name, value in ema.averager.states[0].averages_by_name().items()}
    write_snapshot(tmp_path, 16, SIGMA_RELS, [intruder, intruder], run_id="intruder")
    backward(model, ema)  # to 32 samples: a step that writes
    written, before = files(tmp_path), state_of(model, ema)
    with pytest.raises(ValueError, match=r"post_hoc-000000000000016.pt \(run intruder; this run: run [0-9a-f]{32}\)"):
        optimizer_step(optimizer, ema)
    assert_unchanged(before, state_of(model, ema))
    assert files(tmp_path) == written


def test_reset_starts_a_new_run_which_refuses_the_snapshots_of_the_one_before(tmp_path):
    model, optimizer, ema = run(tmp_path, steps=5)
    earlier = ema.averager.run_id
    ema.reset()
    assert ema.averager.run_id != earlier and ema.samples_seen == 0
    with pytest.raises(ValueError, match=rf"{FIRST} \(run {earlier}; this run: run {ema.averager.run_id}\)\."):
        step(model, optimizer, ema)


def test_a_file_that_is_no_snapshot_is_refused_by_name(tmp_path):
    (tmp_path / FIRST).write_bytes(b"not a snapshot")
    model, optimizer, ema = build(tmp_path)
    with pytest.raises(
        ValueError,
        match=rf"`snapshot_dir`='.*' holds {FIRST}, which is no snapshot this run can tell as its own \(The snapshot"
        rf" '.*{FIRST}' cannot be read .*\)\. Remove it, or give this run a new `snapshot_dir`",
    ):
        step(model, optimizer, ema)


def test_snapshots_without_a_run_id_are_another_runs_unless_the_resumed_state_has_none_either(tmp_path):
    model, optimizer, old = run(tmp_path, steps=5)  # a snapshot at 32
    strip_run_ids(tmp_path)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": old.state_dict()}
    del state["ema"]["run_id"]  # a state saved before run ids
    # a new run: they are another run's
    fresh_model, fresh_optimizer, fresh = build(tmp_path)
    with pytest.raises(
        ValueError,
        match=rf"{FIRST} \(no run id: written before run ids; this run: run {fresh.averager.run_id}\)\. Its",
    ):
        step(fresh_model, fresh_optimizer, fresh)
    # the run that wrote them, resumed from its state: its own, and it writes on without an id
    model, optimizer, resumed = build(tmp_path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["ema"])
    assert resumed.averager.run_id is None and "run_id" not in resumed.state_dict()
    for index in range(4):  # to 72 samples: a snapshot at 64
        step(model, optimizer, resumed, seed=index)
    later = torch.load(tmp_path / "post_hoc-000000000000064.pt", weights_only=True)
    assert "run_id" not in later and later["sigma_rels"] == [0.05, 0.10]
    assert reconstruct_post_hoc(tmp_path, sigma_rel=0.10).residual < 1e-6
    # a snapshot with a run id in its directory is another run's
    intruder = {name: value.clone() for name, value in resumed.averager.states[0].averages_by_name().items()}
    write_snapshot(tmp_path, 80, SIGMA_RELS, [intruder, intruder], run_id="intruder")
    for index in range(2):  # to 88 samples: no snapshot is written, the directory is not read again
        step(model, optimizer, resumed, seed=index)
    with pytest.raises(
        ValueError,
        match=r"post_hoc-000000000000080.pt \(run intruder; this run: no run id, resumed from a state saved"
        r" before run ids\)\.",
    ):
        step(model, optimizer, resumed)


# ----------------------------------------------------------------------------------- what reconstruction refuses
def one_run(directory: Path) -> Path:
    """A run's snapshots at 32 and 64 samples in ``directory``."""
    run(directory)
    return directory


def copy_from(source: Path, name: str, directory: Path, as_name: str = "") -> None:
    shutil.copy(source / name, directory / (as_name or name))


def run_id_of(path: Path) -> str:
    return torch.load(path, weights_only=True)["run_id"]


def two_runs(tmp_path: Path) -> str:
    """Another run of the same model, with steps of 12 samples (a snapshot at 36), one of its snapshots copied in."""
    run(tmp_path / "other", steps=4, batch=12)
    copy_from(tmp_path / "other", "post_hoc-000000000000036.pt", tmp_path / "run")
    mine, other = (run_id_of(tmp_path / "run" / FIRST), run_id_of(tmp_path / "run" / "post_hoc-000000000000036.pt"))
    return rf"The snapshots '.*{FIRST}' \(run {mine}\) and '.*post_hoc-000000000000036.pt' \(run {other}\) in '.*run'"


def one_without_id(tmp_path: Path) -> str:
    rewrite(tmp_path / "run" / FIRST, lambda snapshot: snapshot.pop("run_id"))
    return rf"The snapshots '.*{FIRST}' \(no run id: written before run ids\) and '.*064.pt' \(run [0-9a-f]{{32}}\)"


def interleaved(tmp_path: Path) -> str:
    """Two runs from before run ids, with other lengths: only the labels tell them apart."""
    run(tmp_path / "other", steps=4, batch=12, sigma_rels=(0.05, 0.2))
    copy_from(tmp_path / "other", "post_hoc-000000000000036.pt", tmp_path / "run")
    strip_run_ids(tmp_path / "run")
    return rf"The snapshots '.*{FIRST}' and '.*036.pt' track sigma_rels \[0.05, 0.1\] and \[0.05, 0.2\]"


def duplicate(tmp_path: Path) -> str:
    copy_from(tmp_path / "run", FIRST, tmp_path / "run", "post_hoc-32.pt")
    return rf"The snapshots '.*{FIRST}' and '.*post_hoc-32.pt' are both named for 32 samples: one is a copy"


def renamed(tmp_path: Path) -> str:
    (tmp_path / "run" / FIRST).rename(tmp_path / "run" / "post_hoc-000000000000048.pt")
    return r"The snapshot '.*post_hoc-000000000000048.pt' holds samples=32, but its name says 48: it was renamed"


def samples_changed(tmp_path: Path) -> str:
    rewrite(tmp_path / "run" / FIRST, lambda snapshot: snapshot.update(samples=64))
    return rf"The snapshot '.*{FIRST}' holds samples=64, but its name says 32"


def zero_samples(tmp_path: Path) -> str:
    copy_from(tmp_path / "run", FIRST, tmp_path / "run", "post_hoc-000000000000000.pt")
    rewrite(tmp_path / "run" / "post_hoc-000000000000000.pt", lambda snapshot: snapshot.update(samples=0))
    return r"The snapshot '.*post_hoc-000000000000000.pt' is named for 0 samples; a snapshot is taken after at least"


def swapped_labels(tmp_path: Path) -> str:
    rewrite(tmp_path / "run" / FIRST, lambda snapshot: snapshot["sigma_rels"].reverse())
    return rf"The snapshot '.*{FIRST}' lists sigma_rels \[0.1, 0.05\] out of the ascending order .*: its labels"


def swapped_labels_before_run_ids(tmp_path: Path) -> str:
    strip_run_ids(tmp_path / "run")
    rewrite(tmp_path / "run" / FIRST, lambda snapshot: snapshot["sigma_rels"].reverse())
    return rf"The snapshots '.*{FIRST}' and '.*064.pt' track sigma_rels \[0.1, 0.05\] and \[0.05, 0.1\]"


def integers_in_one_ema(tmp_path: Path) -> str:
    rewrite(tmp_path / "run" / FIRST, lambda snapshot: snapshot["averages"][1].update(
        {"0.weight": snapshot["averages"][1]["0.weight"].long()}))  # fmt: skip
    return (
        rf"The snapshot '.*{FIRST}' stores '0.weight' as torch.int64 in the EMA of sigma_rel 0.1 and as"
        r" torch.float32 in that of 0.05"
    )


def integers_in_one_file(tmp_path: Path) -> str:
    def change(snapshot):
        for averages in snapshot["averages"]:
            averages["0.weight"] = averages["0.weight"].long()

    rewrite(tmp_path / "run" / FIRST, change)
    return rf"The snapshots '.*{FIRST}' and '.*064.pt' disagree on the dtype of '0.weight': torch.int64 and"


def integers_in_every_file(tmp_path: Path) -> str:
    def change(snapshot):
        for averages in snapshot["averages"]:
            averages["0.weight"] = (averages["0.weight"] * 1000).round().long()  # fixed point

    for path in sorted((tmp_path / "run").iterdir()):
        rewrite(path, change)
    return (
        rf"The snapshot '.*{FIRST}' stores '0.weight' as torch.int64, but its EMAs of sigma_rel 0.05 and 0.1"
        r" differ: an averaged \(floating-point\) tensor was stored as an integer"
    )


def bad_run_id(tmp_path: Path) -> str:
    rewrite(tmp_path / "run" / FIRST, lambda snapshot: snapshot.update(run_id=5))
    return rf"The snapshot '.*{FIRST}' has run_id=5; a non-empty str \(or none, before run ids\) is allowed"


def bad_sigma_rels(tmp_path: Path) -> str:
    rewrite(tmp_path / "run" / FIRST, lambda snapshot: snapshot.update(sigma_rels=[0.05, 0.5]))
    return rf"The snapshot '.*{FIRST}' has sigma_rels=\[0.05, 0.5\]; a list of distinct floats in \(0, 0.288675\]"


@pytest.mark.parametrize(
    "spoil",
    [
        two_runs, one_without_id, interleaved, duplicate, renamed, samples_changed, zero_samples, swapped_labels,
        swapped_labels_before_run_ids, integers_in_one_ema, integers_in_one_file, integers_in_every_file, bad_run_id,
        bad_sigma_rels,
    ],
)  # fmt: skip
def test_reconstruction_refuses_snapshots_that_do_not_belong_together_and_names_the_file(tmp_path, spoil):
    one_run(tmp_path / "run")
    assert reconstruct_post_hoc(tmp_path / "run", sigma_rel=0.1).residual < 1e-6
    match = spoil(tmp_path)
    with pytest.raises(ValueError, match=match):
        reconstruct_post_hoc(tmp_path / "run", sigma_rel=0.1)
    first = min(int(path.name[9:-3]) for path in (tmp_path / "run").iterdir())
    with pytest.raises(ValueError, match=match):  # also where the target ends at the first snapshot
        reconstruct_post_hoc(tmp_path / "run", sigma_rel=0.1, at_samples=first)


def test_reconstruction_names_a_missing_path_and_a_file(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(
        FileNotFoundError,
        match=rf"`directory`='{re.escape(os.fspath(missing))}' does not exist: give the directory the post-hoc EMA"
        r" wrote its snapshots to \(`snapshot_dir=`, or the callback's `directory=`\)",
    ):
        reconstruct_post_hoc(missing, sigma_rel=0.1)
    run(tmp_path / "run")
    snapshot = tmp_path / "run" / FIRST
    with pytest.raises(
        NotADirectoryError,
        match=rf"`directory`='{re.escape(os.fspath(snapshot))}' is a file, not a directory: give the directory that"
        r" holds the snapshots \(post_hoc-<samples>.pt\), not one snapshot",
    ):
        reconstruct_post_hoc(snapshot, sigma_rel=0.1)


# ------------------------------------------------------------------------------------------- writing a snapshot
def averages_of(ema) -> list[dict[str, torch.Tensor]]:
    return [state.averages_state_dict() for state in ema.averager.states]


def test_a_snapshot_is_written_through_a_temporary_file_of_its_own(tmp_path, monkeypatch):
    _, _, ema = run(tmp_path / "unused", steps=1)  # 8 samples: nothing written
    (tmp_path / "post_hoc-000000000000032.tmp").mkdir()  # the fixed name the writer used before: now unused
    stale = tmp_path / "post_hoc-000000000000032-mine-taken.tmp"
    stale.write_bytes(b"another writer's")  # the first random name drawn: created exclusively, so not reused
    names = iter(["taken", "free", "free"])
    monkeypatch.setattr(post_hoc.secrets, "token_hex", lambda _: next(names))
    opened = []
    open_file = os.open

    def recording_open(path, flags, mode):
        opened.append((Path(path).name, flags, mode))
        return open_file(path, flags, mode)

    monkeypatch.setattr(post_hoc.os, "open", recording_open)
    path = write_snapshot(tmp_path, 32, SIGMA_RELS, averages_of(ema), run_id="mine")
    assert path == tmp_path / FIRST and torch.load(path, weights_only=True)["run_id"] == "mine"
    assert [name for name, _, _ in opened] == [stale.name, "post_hoc-000000000000032-mine-free.tmp"]  # the run's id
    assert all(flags & os.O_EXCL and flags & os.O_CREAT and mode == 0o666 for _, flags, mode in opened)
    assert stale.read_bytes() == b"another writer's"
    assert {p.name for p in tmp_path.iterdir()} == {FIRST, stale.name, "post_hoc-000000000000032.tmp"}
    opened.clear()  # a run id that is no plain name (a state edited by hand) stays out of the name
    write_snapshot(tmp_path, 64, SIGMA_RELS, averages_of(ema), run_id="../elsewhere")
    assert [name for name, _, _ in opened] == ["post_hoc-000000000000064-free.tmp"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_a_snapshot_has_the_permissions_a_plain_torch_save_gives(tmp_path, umask):
    _, _, ema = run(tmp_path / "unused", steps=1)  # 8 samples: nothing written
    previous = os.umask(umask)
    try:
        path = write_snapshot(tmp_path, 32, SIGMA_RELS, averages_of(ema), run_id="mine")
        torch.save({}, tmp_path / "plain.pt")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "plain.pt").stat().st_mode) == 0o666 & ~umask


def test_a_failed_write_leaves_no_file_behind(tmp_path, monkeypatch):
    _, _, ema = run(tmp_path / "unused", steps=1)  # 8 samples: nothing written

    def failing_save(obj, stream):
        stream.write(b"half a snapshot")
        raise OSError("No space left on device")

    monkeypatch.setattr(post_hoc.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left on device"):
        write_snapshot(tmp_path, 32, SIGMA_RELS, averages_of(ema), run_id="mine")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- what a step costs
@pytest.mark.parametrize(
    ("update_every", "batch", "listed", "written"),
    [
        (1, 8, [1, 0, 0, 1, 0, 0, 0, 1], [32, 64]),  # a snapshot at the 4th and 8th steps
        (4, 12, [1, 0, 1, 0, 0, 1, 0, 0], [48, 96]),  # 32 crossed at the 3rd step, 64 at the 6th: written at updates
    ],
    ids=["every-step", "update_every-4"],
)
def test_the_directory_is_listed_once_before_the_first_step_and_once_per_snapshot_written(
    tmp_path, monkeypatch, update_every, batch, listed, written
):
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ema = ScaledEMA(
        model, optimizer, sigma_rels=SIGMA_RELS, snapshot_every_samples=32, snapshot_dir=tmp_path, base_batch_size=4,
        update_every=update_every,
    )  # fmt: skip
    listings = []
    iterdir = Path.iterdir

    def counting_iterdir(path):
        if path == tmp_path:
            listings.append(ema.optimizer_steps)
        return iterdir(path)

    monkeypatch.setattr(Path, "iterdir", counting_iterdir)
    per_step = []
    for index in range(8):
        before = len(listings)
        step(model, optimizer, ema, batch, seed=index)
        per_step.append(len(listings) - before)
    monkeypatch.undo()
    assert per_step == listed
    assert sorted(int(path.name[9:-3]) for path in tmp_path.iterdir()) == written


# ----------------------------------------------------------------------- a resume from an earlier state
def test_a_resume_from_an_earlier_state_rewrites_the_snapshots_of_the_abandoned_attempt(tmp_path):
    def attempt(state, lr):
        """From ``state`` (40 samples) to 80 with ``lr``, then the end-of-training snapshot; the EMAs at 64 and 80."""
        model, optimizer, ema = build(tmp_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        emas = {}
        for index in range(5, 10):
            step(model, optimizer, ema, seed=index)
            if ema.samples_seen == 64:
                emas[64] = copied(averages_of(ema))
        assert ema.save_snapshot() == os.fspath(tmp_path / "post_hoc-000000000000080.pt")
        emas[80] = copied(averages_of(ema))
        return emas

    def copied(averages):
        return [{name: value.clone() for name, value in average.items()} for average in averages]

    def saved(samples):
        return torch.load(tmp_path / f"post_hoc-{samples:015d}.pt", weights_only=True)["averages"]

    def same(a, b):
        return all(torch.equal(x[name], y[name]) for x, y in zip(a, b) for name in x)

    model, optimizer, ema = run(tmp_path, steps=5)  # 40 samples: a snapshot at 32
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict()}
    state = {key: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in value.items()} for key, value in
             state.items()}  # fmt: skip
    first_32 = (tmp_path / FIRST).read_bytes()
    first = attempt(state, lr=0.05)  # to 80 samples: snapshots at 64 and, at the end, 80
    second = attempt(state, lr=0.2)  # the same run (its id) from 40 samples again, with another lr: it overwrites
    assert not same(first[64], second[64]) and not same(first[80], second[80])
    assert same(saved(64), second[64]) and same(saved(80), second[80])
    assert (tmp_path / FIRST).read_bytes() == first_32  # before the resumed state: not written again
    third = attempt(state, lr=0.05)  # an uninterrupted resume rewrites what the first attempt wrote
    assert same(third[64], first[64]) and same(saved(64), first[64]) and same(saved(80), first[80])
    assert sorted(path.name for path in tmp_path.iterdir()) == [FIRST, "post_hoc-000000000000064.pt",
                                                               "post_hoc-000000000000080.pt"]  # fmt: skip


# -------------------------------------------------------------------------- temporary files a kill leaves
class Killed(BaseException):
    """The process killed mid-write (SIGKILL): nothing cleans up after it."""


def test_a_resumed_run_removes_the_temporary_files_of_its_killed_writes_and_no_other_runs(tmp_path, monkeypatch):
    model, optimizer, ema = run(tmp_path, steps=3)  # 24 samples: nothing written yet
    run_id = ema.averager.run_id
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict()}

    def killed_save(obj, stream):
        stream.write(b"half a snapshot")
        raise Killed

    with monkeypatch.context() as patch:  # killed in the write of the snapshot at 32: its temporary file stays
        patch.setattr(post_hoc.torch, "save", killed_save)
        patch.setattr(Path, "unlink", lambda path, missing_ok=False: None)
        with pytest.raises(Killed):
            step(model, optimizer, ema, seed=3)
    (mine,) = list(tmp_path.iterdir())
    assert re.fullmatch(rf"post_hoc-000000000000032-{run_id}-[0-9a-f]{{16}}\.tmp", mine.name)
    others = [
        f"post_hoc-000000000000032-{'f' * 32}-0123456789abcdef.tmp",  # another run's: it may be writing it now
        "post_hoc-000000000000032-0123456789abcdef.tmp",  # no run id in the name (before run ids): whose is unknown
        "post_hoc-000000000000032.tmp",  # the name older versions wrote through
    ]
    for name in others:
        (tmp_path / name).write_bytes(b"")
    model, optimizer, resumed = build(tmp_path)  # resumed from 24 samples: its leftover is removed
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["ema"])
    step(model, optimizer, resumed, seed=3)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([FIRST, *others])
    # a new run finds nothing of its own to remove
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / mine.name).write_bytes(b"")  # the other run's, to this one
    step(*build(tmp_path / "fresh"))
    assert [path.name for path in (tmp_path / "fresh").iterdir()] == [mine.name]


def test_check_snapshot_dir_is_public_and_belongs_to_the_post_hoc_mode(tmp_path):
    model = torch.nn.Linear(3, 2)
    first = ScaledEMA(model, None, sigma_rels=(0.05,), snapshot_every_samples=4, snapshot_dir=tmp_path)
    first.count_samples(4)
    first.end_step()  # writes a snapshot of the first run
    second = ScaledEMA(model, None, sigma_rels=(0.05,), snapshot_every_samples=4, snapshot_dir=tmp_path)
    with pytest.raises(ValueError, match=r"holds post-hoc snapshots of another run"):
        second.check_snapshot_dir()
    with pytest.raises(RuntimeError, match=r"`check_snapshot_dir\(\)` belongs to a post-hoc EMA"):
        ScaledEMA(model, None, momentum=0.9).check_snapshot_dir()
