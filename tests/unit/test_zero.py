"""DeepSpeed ZeRO-3 partitions on one process, without DeepSpeed: parameters that carry their rank's piece the way
ZeRO-3 lays it out (``ds_id``, ``ds_tensor``, ``ds_shape``), in a module inside a stand-in engine. The real thing,
on 2 processes, is in tests/distributed/test_deepspeed.py."""

from __future__ import annotations

import pytest
import torch

from lightning_emascale import ScaledEMA, consolidate_deepspeed_checkpoint
from lightning_emascale._zero import (
    PARTITIONS_KEY,
    check_layout,
    check_pieces,
    gather_partitions,
    is_deepspeed_engine,
    is_zero3,
    local_pieces,
    piece_length,
)


def partitioned(shape: tuple[int, ...], world: int = 1, rank: int = 0, seed: int = 0) -> torch.nn.Parameter:
    """A frozen parameter laid out as ZeRO-3 lays it out on ``rank`` of ``world``: empty, its piece in ``ds_tensor``."""
    full = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    length = piece_length(full.numel(), world)
    padded = torch.nn.functional.pad(full.reshape(-1), (0, length * world - full.numel()))
    param = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    param.ds_id = seed
    param.ds_tensor = padded[rank * length : (rank + 1) * length].clone()
    param.ds_shape = torch.Size(shape)
    param.ds_numel = full.numel()
    return param


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = partitioned((3, 5), seed=1)
        self.bias = partitioned((3,), seed=2)
        self.register_buffer("scale", torch.tensor([2.0]))  # buffers are never partitioned


class DeepSpeedEngine(torch.nn.Module):
    """Stands in for ``deepspeed.DeepSpeedEngine``: recognised by its class name and module, counts cache drops."""

    __module__ = "deepspeed.runtime.engine"

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.cache_drops = 0

    def empty_partition_cache(self) -> None:
        self.cache_drops += 1


def test_the_stand_ins_are_what_the_library_recognises():
    net = Net()
    assert is_zero3(net.weight) and not is_zero3(net.scale)
    assert is_deepspeed_engine(DeepSpeedEngine(net)) and not is_deepspeed_engine(net)


def test_pieces_put_back_together_equal_the_full_tensor():
    ranks = [partitioned((7, 9), world=4, rank=rank) for rank in range(4)]
    assert [p.ds_tensor.numel() for p in ranks] == [16] * 4  # 63 elements over 4 ranks: the last piece padded
    whole = partitioned((7, 9)).ds_tensor.reshape(7, 9)  # the same values, on one rank
    joined = gather_partitions([{"w": p.ds_tensor, "b": torch.ones(2)} for p in ranks], {"w": [7, 9]})
    assert torch.equal(joined["w"], whole) and torch.equal(joined["b"], torch.ones(2))
    with pytest.raises(ValueError, match=r"The pieces of 'w' hold 32 elements over 2 ranks, fewer than its shape"):
        gather_partitions([{"w": p.ds_tensor} for p in ranks[:2]], {"w": [7, 9]})


def test_a_full_tensor_is_cut_into_this_ranks_piece_and_a_piece_passes_as_it_is():
    param = partitioned((3, 5), seed=4)
    full = torch.arange(15.0).reshape(3, 5)
    (piece,) = local_pieces([param], [full])
    assert torch.equal(piece, full.reshape(-1))  # one process: rank 0 of 1
    (same,) = local_pieces([param], [param.ds_tensor])
    assert same is param.ds_tensor
    check_pieces(["w"], [param], [full])
    check_pieces(["w"], [param], [param.ds_tensor])
    with pytest.raises(ValueError, match=r"The saved EMA of 'w' is a tensor of shape \[4\]: it is neither this rank's"):
        check_pieces(["w"], [param], [torch.zeros(4)])


def test_layout_checks_name_the_ranks_and_the_shapes():
    here = {"rank": 0, "world_size": 2, "shapes": {"w": [3, 5]}}
    check_layout(here, here, "The saved EMA")
    with pytest.raises(ValueError, match=r"holds the ZeRO-3 partitions of rank 1 of 4, and this is rank 0 of 2"):
        check_layout({"rank": 1, "world_size": 4, "shapes": {"w": [3, 5]}}, here, "The saved EMA")
    with pytest.raises(ValueError, match=r"the saved shapes of \['w'\] differ from the model's \(\[\[5, 3\]\] saved"):
        check_layout({"rank": 0, "world_size": 2, "shapes": {"w": [5, 3]}}, here, "The saved EMA")
    with pytest.raises(ValueError, match=r"its 'zero3_partitions' entry is not a partition layout, got \[1\]"):
        check_layout([1], here, "The saved EMA")


def test_scaled_ema_of_a_partitioned_module_averages_the_pieces_and_swaps_through_the_engine():
    net = Net()
    engine = DeepSpeedEngine(net)
    ema = ScaledEMA(engine, None, momentum=0.5, base_batch_size=4, auto_end_step=False)
    assert ema.module is net and ema.is_sharded
    start = net.weight.ds_tensor.clone()
    with torch.no_grad():
        net.weight.ds_tensor.add_(2.0)
    ema.count_samples(4)
    ema.end_step()
    averages = ema.ema_state_dict()
    assert averages["weight"].shape == (15,)  # the rank's piece, not the full (3, 5)
    torch.testing.assert_close(averages["weight"], start + 1.0)
    state = ema.state_dict()
    assert state[PARTITIONS_KEY] == {"rank": 0, "world_size": 1, "shapes": {"weight": [3, 5], "bias": [3]}}
    raw = net.weight.ds_tensor.clone()
    drops = engine.cache_drops
    with ema.swapped():
        assert torch.equal(net.weight.ds_tensor, averages["weight"])  # written where the next gather reads
        assert engine.cache_drops == drops + 1  # gathered copies dropped before the write
    assert engine.cache_drops == drops + 2  # and after the evaluation
    assert torch.equal(net.weight.ds_tensor, raw)
    with pytest.raises(NotImplementedError, match=r"FSDP2 and DeepSpeed ZeRO-3 gather the parameters they hold"):
        ema.functional_call(engine, (torch.zeros(1),))


def test_a_partitioned_module_without_its_engine_is_refused():
    with pytest.raises(
        ValueError, match=r"partitioned by DeepSpeed ZeRO-3, but the module was given without its engine"
    ):
        ScaledEMA(Net(), None, momentum=0.5)


@pytest.mark.filterwarnings("ignore:`flat_parameters=True` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"flat_parameters": True}, r"flat_parameters=True is not supported for a sharded module .*DeepSpeed ZeRO-3"),
        ({"offload": True}, r"`offload=True` does not apply to a module partitioned by DeepSpeed ZeRO-3"),
        ({"sigma_rels": [0.05], "snapshot_every_samples": 8}, r"a post-hoc EMA \(`sigma_rels`\) is not supported"),
    ],
)
def test_options_a_partitioned_module_cannot_take_are_refused(option, message, tmp_path):
    option = {**option, "snapshot_dir": tmp_path} if "sigma_rels" in option else {"momentum": 0.5, **option}
    net = Net()
    before = net.weight.ds_tensor.clone()
    with pytest.raises(ValueError, match=message):
        ScaledEMA(DeepSpeedEngine(net), None, **option)
    assert torch.equal(net.weight.ds_tensor, before)


def test_partitioned_state_loads_only_where_its_layout_fits():
    ema = ScaledEMA(DeepSpeedEngine(Net()), None, momentum=0.5, auto_end_step=False)
    state = ema.state_dict()
    other_world = {**state, PARTITIONS_KEY: {**state[PARTITIONS_KEY], "world_size": 4, "rank": 3}}
    with pytest.raises(ValueError, match=r"rank 3 of 4, and this is rank 0 of 1: a partitioned EMA resumes at the"):
        ema.load_state_dict(other_world)
    plain = torch.nn.Linear(5, 3)
    unpartitioned = ScaledEMA(plain, None, momentum=0.5)
    with pytest.raises(ValueError, match=r"holds one rank's pieces of a DeepSpeed ZeRO-3 model \(rank 0 of 1\), and"):
        unpartitioned.load_state_dict(state)
    # a full (consolidated) EMA loads into the pieces
    full = {key: value for key, value in state.items() if key != PARTITIONS_KEY}
    full["ema"] = {**state["ema"], "weight": torch.ones(3, 5), "bias": torch.ones(3)}
    ema.load_state_dict(full)
    assert torch.equal(ema.ema_state_dict()["weight"], torch.ones(15))


class DeepSpeedZeroOptimizer:
    """Stands in for DeepSpeed's ZeRO optimizer wrapper: a torch optimizer inside ``.optimizer``."""

    __module__ = "deepspeed.runtime.zero.stage3"

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer


def test_deepspeed_optimizer_needs_end_step_called_after_the_engine_step():
    net = torch.nn.Linear(2, 2)
    wrapped = DeepSpeedZeroOptimizer(torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"inside DeepSpeed's DeepSpeedZeroOptimizer has stepped, before DeepSpeed"):
        ScaledEMA(net, wrapped, momentum=0.5)
    ema = ScaledEMA(net, wrapped, momentum=0.5, auto_end_step=False, optimizer_rule="sgd", base_batch_size=2)
    net(torch.ones(4, 2)).sum().backward()
    ema.count_samples(4)
    wrapped.optimizer.step()  # what DeepSpeed's step runs inside: the rule scales it (kappa 2)
    ema.end_step()
    assert ema.step_lrs == [[pytest.approx(0.2)]] and ema.optimizer_steps == 1


def test_consolidate_refuses_what_is_not_a_deepspeed_checkpoint(tmp_path):
    pytest.importorskip("deepspeed")  # Lightning's converter needs it
    with pytest.raises(FileNotFoundError, match=r"`checkpoint_dir`='.*missing' is not a directory"):
        consolidate_deepspeed_checkpoint(tmp_path / "missing", tmp_path / "out.ckpt")
    with pytest.raises(TypeError, match=r"`ema_as_weights` must be True or False, got 'yes'"):
        consolidate_deepspeed_checkpoint(tmp_path, tmp_path / "out.ckpt", ema_as_weights="yes")


def test_partition_groups_smaller_than_the_world_are_refused(monkeypatch):
    import lightning_emascale._zero_store as zero_store

    monkeypatch.setattr(zero_store, "partition_group_size", lambda param: 2)  # e.g. MiCS shards of 2 in a world of 1
    with pytest.raises(ValueError, match=r"'weight' is partitioned over 2 ranks and the world has 1 \(a smaller"):
        ScaledEMA(DeepSpeedEngine(Net()), None, momentum=0.5)


class Stage3Optimizer:
    """Stands in for DeepSpeed's ZeRO-3 optimizer: hands out a copy of each master partition (as it does when the
    masters are offloaded to another device)."""

    def get_local_fp32_param(self, param, optim_state_key=None):
        return param.ds_tensor.float().clone()


def test_masters_that_are_copies_are_not_averaged_and_a_warning_says_so():
    pytest.importorskip("deepspeed")  # read_piece asks deepspeed.utils for the master
    net = Net()
    net.weight.requires_grad_(True)
    net.weight._z3_optimizer = Stage3Optimizer()
    with pytest.warns(
        UserWarning, match=r"The fp32 master partitions of 'weight' \(a copy on cpu, not a view on cpu\)"
    ):
        ema = ScaledEMA(DeepSpeedEngine(net), None, momentum=0.5)
    assert ema.averager.tracked[0] is net.weight.ds_tensor  # the piece itself, which stays current


def test_the_padding_of_the_last_piece_is_not_averaged_saved_or_checked(monkeypatch):
    import lightning_emascale._zero as zero
    import lightning_emascale._zero_store as zero_store

    monkeypatch.setattr(zero, "_rank_and_world", lambda: (1, 2))  # the last of 2 ranks
    monkeypatch.setattr(zero_store, "partition_group_size", lambda param: 2)
    net = Net()
    net.weight = partitioned((7, 9), world=2, rank=1, seed=5)  # 63 elements: rank 1 holds 31 and 1 of padding
    with torch.no_grad():
        net.weight.ds_tensor[-1] = float("nan")  # ZeRO-3 never initialises the padding
    ema = ScaledEMA(DeepSpeedEngine(net), None, momentum=0.5, skip_non_finite=True, auto_end_step=False)
    ema.count_samples(4)
    ema.end_step()
    assert ema.skipped_updates == 0  # the NaN is not the parameter's
    piece = ema.ema_state_dict()["weight"]
    assert piece.numel() == 31 and bool(piece.isfinite().all())
    ScaledEMA.check_state_dict(ema.state_dict())  # a saved state with no NaN in it
    full = torch.arange(63.0).reshape(7, 9)
    (cut,) = local_pieces([net.weight], [full])
    assert torch.equal(cut, full.reshape(-1)[32:])  # rank 1's elements, where ZeRO-3 puts them


def test_writing_the_ema_into_a_deepspeed_model_is_refused_before_training():
    """Switch EMA and copy_to would write the parameters and not DeepSpeed's fp32 masters: refused when built (the
    switch) or called, with the module untouched."""
    net = Net()
    before = net.weight.ds_tensor.clone()
    with pytest.raises(
        RuntimeError,
        match=r"`switch_every_samples` is not supported under DeepSpeed: its optimizer keeps fp32 master weights",
    ):
        ScaledEMA(DeepSpeedEngine(net), None, momentum=0.5, switch_every_samples=8)
    ema = ScaledEMA(DeepSpeedEngine(net), None, momentum=0.5, auto_end_step=False)
    with pytest.raises(RuntimeError, match=r"copy_to\(\) is not supported under DeepSpeed: .* consolidate it"):
        ema.copy_to()
    assert torch.equal(net.weight.ds_tensor, before)
