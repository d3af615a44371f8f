"""The post-hoc EMA on the sample clock: its math, the power EMAs in a plain loop, snapshots and reconstruction."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_emascale import ScaledEMA, reconstruct_post_hoc
from lightning_emascale.post_hoc_math import (
    Profile,
    _gauss_legendre,
    gamma_from_sigma_rel,
    inner_product,
    least_squares_weights,
    power_beta,
    sigma_rel_from_gamma,
)

SIGMA_RELS = (0.05, 0.10)


# ----------------------------------------------------------------------------------------------------- the math
@pytest.mark.parametrize(("sigma_rel", "gamma"), [(0.10, 6.94), (0.05, 16.97), (math.sqrt(1 / 12), 0.0)])
def test_sigma_rel_and_gamma_are_edm2s(sigma_rel, gamma):
    assert gamma_from_sigma_rel(sigma_rel) == pytest.approx(gamma, abs=0.005)
    assert sigma_rel_from_gamma(gamma_from_sigma_rel(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-9)


def test_power_profile_inner_products_match_quadrature():
    nodes, weights = _gauss_legendre(200)
    for a, b in [
        (Profile(1000, gamma=6.94), Profile(700, gamma=16.97)),
        (Profile(300, gamma=2.0), Profile(900, gamma=0.5)),
    ]:
        end = min(a.samples, b.samples)
        tau = 0.5 * end * (nodes + 1).double()
        numeric = float(0.5 * end * (weights * a.density(tau) * b.density(tau)).sum())
        assert inner_product(a, b) == pytest.approx(numeric, rel=1e-9)
    exponential = Profile(1000, half_life=100.0)
    rate = math.log(2) / 100
    closed = rate**2 / (1 - math.exp(-rate * 1000)) ** 2 * (1 - math.exp(-2 * rate * 1000)) / (2 * rate)
    assert inner_product(exponential, exponential) == pytest.approx(closed, rel=1e-10)


def test_least_squares_recovers_a_tracked_profile_and_reports_what_it_cannot():
    snapshots = [Profile(s, gamma=gamma_from_sigma_rel(r)) for s in (250, 500, 750, 1000) for r in SIGMA_RELS]
    weights, residual = least_squares_weights(snapshots, Profile(1000, gamma=gamma_from_sigma_rel(0.10)))
    assert residual < 1e-6 and weights[-1] == pytest.approx(1.0, abs=1e-6)
    _, between = least_squares_weights(snapshots, Profile(1000, gamma=gamma_from_sigma_rel(0.075)))
    _, far = least_squares_weights(snapshots, Profile(1000, gamma=gamma_from_sigma_rel(0.25)))
    assert between < 0.05 < far  # measured: 0.033 between the tracked lengths, 0.20+ far outside them


def test_power_beta_keeps_the_profile_in_samples():
    assert power_beta(0, 10, gamma=3.0) == 0.0
    # two steps of 50 equal one step of 100, as for any EMA on the sample clock
    assert power_beta(100, 150, 4.0) * power_beta(150, 200, 4.0) == pytest.approx(power_beta(100, 200, 4.0))
    with pytest.raises(ValueError, match=r"the samples seen must grow: got 10 before and 10 after"):
        power_beta(10, 10, 1.0)


# ------------------------------------------------------------------------------------------- in a plain loop
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))


def batches(sizes: list[int]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(size, 3, generator=generator) for size in sizes]


def run(directory, data, accumulate=1, sigma_rels=SIGMA_RELS, every=32, state=None, record=None):
    """Train on the micro-batches ``data`` (an optimizer step every ``accumulate``) with a post-hoc EMA."""
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ema = ScaledEMA(
        model, optimizer, sigma_rels=sigma_rels, snapshot_every_samples=every, snapshot_dir=directory, base_batch_size=4
    )
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
    for index, x in enumerate(data):
        (model(x).pow(2).mean() / accumulate).backward()
        ema.count_samples(len(x))
        if (index + 1) % accumulate == 0 or index + 1 == len(data):
            optimizer.step()
            optimizer.zero_grad()
            if record is not None:
                record.append((ema.samples_seen, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    return model, optimizer, ema


def test_power_emas_follow_the_float64_recursion_on_the_sample_clock(tmp_path):
    record: list = []
    # accumulation 2, a short last batch, and the batch growing 4 -> 8 -> 16 (a progressive schedule)
    micro_batches = [4] * 6 + [8] * 6 + [16] * 4 + [6]
    _, _, ema = run(tmp_path, batches(micro_batches), accumulate=2, record=record)
    assert [s for s, _ in record] == [8, 16, 24, 40, 56, 72, 104, 136, 142]
    for sigma_rel, state in zip(SIGMA_RELS, ema.averager.states):
        gamma = gamma_from_sigma_rel(sigma_rel)
        expected, before = None, 0
        for samples, weights in record:
            beta = (before / samples) ** (gamma + 1)
            current = {k: v.double() for k, v in weights.items()}
            expected = current if expected is None else {
                k: beta * expected[k] + (1 - beta) * v if weights[k].is_floating_point() else v
                for k, v in current.items()
            }  # fmt: skip
            before = samples
        for name, value in state.averages_by_name().items():
            torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("gamma", [gamma_from_sigma_rel(0.05), gamma_from_sigma_rel(0.10)])
def test_kappa_times_the_batch_keeps_the_profile_in_samples(gamma):
    # A weight equal to the samples seen: the EMA is the profile's mean, (gamma + 1) / (gamma + 2) x S, at any batch.
    means = []
    for batch in (8, 64):
        average, seen = 0.0, 0
        while seen < 8192:
            beta = power_beta(seen, seen + batch, gamma)
            seen += batch
            average = beta * average + (1 - beta) * seen
        means.append(average / 8192)
    assert means[0] == pytest.approx((gamma + 1) / (gamma + 2), abs=2e-3)
    assert means[1] == pytest.approx(means[0], abs=8e-3)  # 8x the batch: the same profile, up to one step


def test_snapshots_come_on_the_sample_clock_and_reconstruct_the_tracked_emas(tmp_path):
    _, _, ema = run(tmp_path, batches([8] * 20))  # 160 samples, a snapshot every 32
    last = (tmp_path / "post_hoc-000000000000160.pt").stat()
    ema.save_snapshot()  # the end of training (a multiple already: nothing new is written)
    assert (tmp_path / "post_hoc-000000000000160.pt").stat().st_ino == last.st_ino  # not written again
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"post_hoc-{s:015d}.pt" for s in (32, 64, 96, 128, 160)]
    for sigma_rel, state in zip(SIGMA_RELS, ema.averager.states):
        rebuilt = reconstruct_post_hoc(tmp_path, sigma_rel=sigma_rel)
        assert rebuilt.residual < 1e-6 and rebuilt.at_samples == 160
        for name, value in state.averages_by_name().items():
            torch.testing.assert_close(rebuilt[name], value, rtol=1e-5, atol=1e-6, msg=name)
    earlier = reconstruct_post_hoc(tmp_path, sigma_rel=0.10, at_samples=96)
    assert max(samples for samples, _, _ in earlier.weights) == 96  # later snapshots are not used


def test_an_intermediate_length_is_close_to_tracking_it_directly(tmp_path):
    data = batches([8] * 64)  # 512 samples
    model, _, _ = run(tmp_path / "pair", data, every=32)
    _, _, direct = run(tmp_path / "direct", data, sigma_rels=(0.075,), every=32)
    rebuilt = reconstruct_post_hoc(tmp_path / "pair", sigma_rel=0.075)
    tracked = direct.averager.states[0].averages_by_name()
    floats = [name for name, value in tracked.items() if value.is_floating_point()]
    error = sum(float((rebuilt[n] - tracked[n]).norm() ** 2) for n in floats) ** 0.5
    scale = sum(float((model.state_dict()[n] - tracked[n]).norm() ** 2) for n in floats) ** 0.5  # EMA lag
    assert 0 < rebuilt.residual < 0.02
    assert error < 0.01 * scale  # measured: 0.34 % of the EMA's distance from the raw weights (residual 0.0035)
    model.load_state_dict(rebuilt)  # a state dict the module loads as it is


def test_resume_writes_the_same_snapshots_as_an_uninterrupted_run(tmp_path):
    data = batches([8] * 12)  # 96 samples: snapshots at 32, 64, 96
    run(tmp_path / "full", data)
    model, optimizer, half = run(tmp_path / "resumed", data[:5])  # stopped at 40 samples, mid-way to 64
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": half.state_dict()}
    run(tmp_path / "resumed", data[5:], state=state)
    names = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "resumed").iterdir()) and len(names) == 3
    for name in names:
        full = torch.load(tmp_path / "full" / name, weights_only=True)
        resumed = torch.load(tmp_path / "resumed" / name, weights_only=True)
        assert full["samples"] == resumed["samples"]
        for a, b in zip(full["averages"], resumed["averages"]):
            assert all(torch.equal(a[k], b[k]) for k in a), name


def test_post_hoc_options_and_reconstruction_errors(tmp_path):
    model = tiny_model()
    kwargs = dict(sigma_rels=SIGMA_RELS, snapshot_every_samples=32, snapshot_dir=tmp_path)
    for bad, error, match in [
        ({"sigma_rels": ()}, ValueError, r"`sigma_rels` must be a non-empty sequence of numbers, got \(\)"),
        ({"sigma_rels": (0.05, 0.05)}, ValueError, r"`sigma_rels` must be distinct, got \[0.05, 0.05\]"),
        ({"sigma_rels": (0.5,)}, ValueError, r"`sigma_rel` must be in \(0, 1/sqrt\(12\) = 0.288675\] .*, got 0.5"),
        ({"snapshot_every_samples": 0}, ValueError, r"`snapshot_every_samples` must be a positive integer, got 0"),
        (
            {"snapshot_dir": None},
            ValueError,
            r"`snapshot_dir` must be a directory path \(a str or os.PathLike\), got None",
        ),
        ({"momentum": 0.99}, ValueError, r"\{'momentum': 0.99\} have no effect on a post-hoc EMA"),
    ]:
        with pytest.raises(error, match=match):
            ScaledEMA(model, **{**kwargs, **bad})
    with pytest.raises(ValueError, match=r"`snapshot_every_samples` and `snapshot_dir` belong to a post-hoc EMA"):
        ScaledEMA(model, snapshot_every_samples=32)
    ema = ScaledEMA(model, **kwargs)
    with pytest.raises(RuntimeError, match=r"A post-hoc EMA keeps power EMAs, not one EMA: reconstruct"):
        ema.ema_state_dict()
    assert ema.save_snapshot() is None  # nothing before the first update
    with pytest.raises(ValueError, match=r"no post-hoc snapshots \(post_hoc-<samples>.pt\) in"):
        reconstruct_post_hoc(tmp_path, sigma_rel=0.1)
    run(tmp_path, batches([8] * 8))
    with pytest.raises(ValueError, match=r"give exactly one of `sigma_rel` and `half_life_samples`, got None and None"):
        reconstruct_post_hoc(tmp_path)
    with pytest.raises(
        ValueError, match=r"`at_samples` must be an integer between the first and the last snapshot \(32"
    ):
        reconstruct_post_hoc(tmp_path, sigma_rel=0.1, at_samples=100)
    with pytest.raises(ValueError, match=r"`half_life_samples` must be a positive finite number, got -1.0"):
        reconstruct_post_hoc(tmp_path, half_life_samples=-1)
    exponential = reconstruct_post_hoc(tmp_path, half_life_samples=16)  # 2 snapshots over 64 samples: a rough fit
    assert 0 < exponential.residual < 1 and set(exponential) == set(model.state_dict())


def test_corrupt_or_mixed_snapshots_are_named(tmp_path):
    run(tmp_path, batches([8] * 8))  # snapshots at 32 and 64 samples
    first, last = sorted(tmp_path.iterdir())
    with pytest.raises(TypeError, match=r"`directory` must be a path \(str or os.PathLike\), got None"):
        reconstruct_post_hoc(None, sigma_rel=0.1)
    saved = torch.load(first, weights_only=True)
    for change, match in [
        (lambda s: s["averages"][0].update({"0.weight": s["averages"][0]["0.weight"] * float("nan")}), "non-finite"),
        (lambda s: s.update(format=99), "has format 99; this version reads format 1"),
        (lambda s: s.pop("sigma_rels"), r"lacks \['sigma_rels'\]"),
        (lambda s: s["averages"][0].update(renamed=torch.zeros(1)), r"hold different tensors .*'renamed'"),
        (
            lambda s: s["averages"][0].update({"0.weight": torch.zeros(7, 7)}),
            r"shape of '0.weight': \(7, 7\) and \(4, 3\)",
        ),
    ]:
        changed = {**saved, "averages": [dict(averages) for averages in saved["averages"]]}
        change(changed)
        torch.save(changed, first)
        with pytest.raises(ValueError, match=rf"The snapshots? '.*{first.name}'.*{match}"):
            reconstruct_post_hoc(tmp_path, sigma_rel=0.1)
    first.write_bytes(b"not a snapshot")
    with pytest.raises(ValueError, match=rf"The snapshot '.*{first.name}' cannot be read"):
        reconstruct_post_hoc(tmp_path, sigma_rel=0.1)
    assert last.exists()
