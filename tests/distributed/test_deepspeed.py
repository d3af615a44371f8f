"""DeepSpeed ZeRO 1, 2 and 3 on 2 CPU processes (gloo), each run in a subprocess with a timeout.

``deepspeed_core_run.py`` (ScaledEMA on a DeepSpeed engine, launched by torchrun) checks the EMA against a reference
kept by hand in the same run, for each stage, fp32 and bf16, and ZeRO-3 with every parameter partitioned and with
DeepSpeed's default persistence threshold; ``deepspeed_run.py`` (Lightning's DeepSpeedStrategy, through a test-only
CPU subclass) checks a fit with validation on the EMA, a resume and the consolidated file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from test_ddp import run_script

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (the `deepspeed` and `test` extras)",
)

CORE_CASES = [
    ("1", "fp32", None),
    ("2", "fp32", None),
    ("1", "bf16", None),
    ("2", "bf16", None),
    ("3", "fp32", 0),  # every parameter partitioned
    ("3", "bf16", 0),
    ("3", "fp32", 100_000),  # DeepSpeed's default: this model's small parameters stay whole between steps
    ("3", "bf16", 100_000),
]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


@pytest.mark.parametrize(("stage", "dtype", "threshold"), CORE_CASES)
def test_scaled_ema_on_a_deepspeed_engine_equals_the_ema_of_the_full_weights(tmp_path, stage, dtype, threshold):
    out = tmp_path / "core.pt"
    args = [out, stage, dtype] + ([] if threshold is None else [threshold])
    run_script("deepspeed_core_run.py", *args, cwd=tmp_path, torchrun=True)
    result = torch.load(out, weights_only=False)
    # 2 ranks x 4 samples against base 4: kappa 2, and SGD's learning rate doubled for the step
    assert result["kappas"] == [2.0] * 6
    assert result["lrs"] == [pytest.approx(0.1)] * 6
    # the ranks' pieces put together equal the EMA of the full weights (ZeRO-3: the fp32 masters), exactly
    assert max_difference(result["ema"], result["reference"]) == 0.0
    assert result["ema_dtypes"] == ["torch.float32"]  # an fp32 EMA of bf16 parameters too
    if stage == "3":  # each rank holds its piece: about half the EMA (padded)
        assert result["piece_numel"] == 141 and result["full_numel"] == 276
    else:
        assert result["piece_numel"] == result["full_numel"] == 276
    # a swap right after a step: the forward inside sees the EMA, the one after the training weights again
    torch.testing.assert_close(result["swapped_after_step"], result["expected_after_step"], rtol=0, atol=0)
    assert torch.equal(result["raw_after_step"], result["raw_before"])
    # a swap after a no-grad forward left parameters gathered
    torch.testing.assert_close(result["swapped"], result["expected_swapped"], rtol=0, atol=0)
    assert float((result["swapped"] - result["raw"]).abs().max()) > 0.01  # the EMA differs from the weights
    assert torch.equal(result["raw_again"], result["raw"])
    for name, value in result["weights_before"].items():
        assert torch.equal(result["weights_after"][name], value), name  # training weights restored bit for bit
    assert result["reload_equal"] and result["full_reload_equal"]  # per-rank state, and a full EMA cut into pieces
    # skip_non_finite: a NaN in rank 1's piece skips the update on both ranks
    assert result["skipped"] == [1, 1] and result["kept_on_rank0"]


@pytest.mark.parametrize(("dtype", "threshold"), [("fp32", 0), ("bf16", 100_000)])
def test_zero3_teacher_moves_partition_by_partition_and_its_next_forward_sees_it(tmp_path, dtype, threshold):
    out = tmp_path / "teacher.pt"
    run_script("deepspeed_teacher_run.py", out, dtype, threshold, cwd=tmp_path, torchrun=True)
    result = torch.load(out, weights_only=False)
    assert result["kappa"] == 2.0 and result["updates"] == 5
    assert result["moved"] > 1e-3  # the student trained, so the teacher had somewhere to go
    # the teacher's forward right after each update equals a plain model holding the reference teacher
    assert result["gaps"] == [0.0] * 5


@pytest.fixture(
    scope="module", params=[("3", "fp32"), ("2", "bf16"), ("1", "fp32")], ids=["zero3-fp32", "zero2-bf16", "zero1-fp32"]
)
def lightning_runs(request, tmp_path_factory) -> tuple[str, str, Path]:
    stage, dtype = request.param
    out = tmp_path_factory.mktemp(f"zero{stage}-{dtype}")
    for mode in ("fit", "resume", "ragged"):
        run_script("deepspeed_run.py", mode, out, stage, dtype, cwd=out, timeout=420)
    run_script("deepspeed_run.py", "consolidate", out, stage, dtype, cwd=out)
    if stage == "3":
        for mode in ("reshard", "refuse"):
            run_script("deepspeed_run.py", mode, out, stage, dtype, cwd=out)
    return stage, dtype, out


def test_deepspeed_strategy_fit_counts_kappa_over_ranks_and_accumulation_and_validates_on_the_ema(lightning_runs):
    _, _, out = lightning_runs
    fit = torch.load(out / "fit.pt", weights_only=False)
    # 2 per device x 2 ranks x 2 micro-batches = 8 against base 4; 32 samples an epoch, 3 epochs
    assert fit["rows"] == [(step, 8 * step, 2.0) for step in range(1, 13)]
    assert fit["engine_steps"] == fit["global_step"] == 12
    assert max_difference(fit["ema"], fit["reference"]) == 0.0
    assert len(fit["validation"]) == 3
    for seen, expected in fit["validation"]:  # the forward at validation start runs on the EMA
        torch.testing.assert_close(seen, expected, rtol=0, atol=0)
    ((seen, expected),) = fit["validate_after_fit"]  # trainer.validate after fit: a new inference engine, the EMA
    torch.testing.assert_close(seen, expected, rtol=0, atol=0)


def test_deepspeed_kappa_follows_the_engines_windows_across_epochs_and_a_second_fit(lightning_runs):
    _, _, out = lightning_runs
    ragged = torch.load(out / "ragged.pt", weights_only=False)
    # 5 micro-batches an epoch per rank, 2 per step: DeepSpeed's windows run across epochs (7 steps in 3 epochs, one
    # micro-batch left over), and the second fit (2 more epochs, a new engine) takes 5 more; each step 8 samples
    assert ragged["first_fit"] == 7
    assert ragged["rows"] == [(step, 8 * step, 2.0) for step in range(1, 13)]
    # after the second fit the EMA still equals the EMA of the full weights: it follows the new engine's masters
    assert max_difference(ragged["ema"], ragged["reference"]) == 0.0


def test_deepspeed_resume_is_bit_identical(lightning_runs):
    stage, _, out = lightning_runs
    fit = torch.load(out / "fit.pt", weights_only=False)
    resumed = torch.load(out / "resume.pt", weights_only=False)
    assert resumed["rows"] == fit["rows"][4:]  # resumed after step 4, the end of the first epoch
    for key in ("ema", "weights", "pieces_rank0"):
        for name, value in fit[key].items():
            assert torch.equal(resumed[key][name], value), (key, name)
    if stage == "3":  # rank 0's own pieces came back from its own file
        assert resumed["layout"]["world_size"] == 2
        assert resumed["pieces_rank0"]["net.0.weight"].shape == (32,)  # 7 x 9 = 63 over 2 ranks, padded


def test_consolidated_deepspeed_checkpoint_holds_the_whole_ema(lightning_runs):
    _, _, out = lightning_runs
    mid = torch.load(out / "mid_ema.pt", weights_only=False)
    consolidated = torch.load(out / "consolidated.pt", weights_only=False)
    # load_from_checkpoint gives the EMA weights (fp32 masters consolidated: the EMA exactly)
    assert max_difference(consolidated["state_dict"], mid["ema"]) == 0.0
    state = consolidated["checkpoint"]["callbacks"]["EMAScalingCallback{'name': 'ema'}"]
    assert "zero3_partitions" not in state and state["model_entries"] == "ema"
    assert max_difference(state["ema"], mid["ema"]) == 0.0
    for name, value in mid["masters"].items():  # the training weights: DeepSpeed's fp32 masters, consolidated
        assert torch.equal(state["raw_state_dict"][name], value), name
    assert max_difference(consolidated["plain_ema"], mid["ema"]) == 0.0  # a one-device ScaledEMA loads the state


# ZeRO-3 only (DeepSpeed reads a single file, `load_full_weights`, under ZeRO-3 alone): the fixture's ZeRO-3 run
@pytest.mark.parametrize("lightning_runs", [("3", "fp32")], indirect=True, ids=["zero3-fp32"])
def test_zero3_fit_resumes_on_another_world_size_from_the_consolidated_file(lightning_runs):
    _, _, out = lightning_runs
    mid = torch.load(out / "mid_ema.pt", weights_only=False)
    started = torch.load(out / "reshard.pt", weights_only=False)
    # saved on 2 ranks after 4 steps of 8 samples, resumed on 1: the whole EMA is this rank's piece, flattened
    assert started["samples_seen"] == 32
    assert started["layout"]["world_size"] == 1
    for name, value in mid["ema"].items():
        assert torch.equal(started["ema"][name], value.reshape(-1)), name
    refused = torch.load(out / "refuse.pt", weights_only=False)
    assert "holds training weights beside an EMA put into the checkpoint's state_dict" in refused["error"]
    assert "Consolidate with `ema_as_weights=False`" in refused["error"]


def test_consolidation_refuses_a_missing_tag_and_mixed_ranks_and_writes_nothing(lightning_runs, tmp_path):
    import shutil

    from lightning_emascale import consolidate_deepspeed_checkpoint

    stage, _, out = lightning_runs
    with pytest.raises(FileNotFoundError, match=r"`tag`='nope' is not a checkpoint in .*; it holds \['checkpoint'\]"):
        consolidate_deepspeed_checkpoint(out / "mid", tmp_path / "a.ckpt", tag="nope")
    if stage != "3":
        return  # one file: nothing to mix
    mixed = tmp_path / "mixed"
    shutil.copytree(out / "mid", mixed)
    rank_one = mixed / "checkpoint" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    states = torch.load(rank_one, weights_only=False)
    states["callbacks"]["EMAScalingCallback{'name': 'ema'}"]["samples_seen"] += 8  # a later step's file
    torch.save(states, rank_one)
    with pytest.raises(ValueError, match=r"in rank 1's file is not rank 1's piece of the same step \(it says rank 1,"):
        consolidate_deepspeed_checkpoint(mixed, tmp_path / "b.ckpt")
    del states["callbacks"]["EMAScalingCallback{'name': 'ema'}"]  # a file written without this EMA
    torch.save(states, rank_one)
    with pytest.raises(ValueError, match=r"Rank 1's file holds no ZeRO-3 piece of the EMA state"):
        consolidate_deepspeed_checkpoint(mixed, tmp_path / "c.ckpt")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mixed"]  # no file, not even a partial one
