"""The EMA written out and back: ``PolyakEMA.write_into_module`` (the EMA into the module for good, "switch EMA"),
``save_ema_weights``/``load_ema_weights`` (a safetensors file by the module's names, ties in the metadata) and
``save_ema_pretrained`` (the module's own ``save_pretrained`` with the EMA swapped in). Every refusal changes
nothing. No Trainer."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch

from lightning_emascale import ScaledEMA
from lightning_emascale._zero_store import ZeroPartitionStore
from lightning_emascale.export import load_ema_weights, save_ema_pretrained, save_ema_weights

safetensors_torch = pytest.importorskip("safetensors.torch")


# ----------------------------------------------------------------------------------------------------- models
def net() -> torch.nn.Module:
    """Linear -> BatchNorm -> Linear (float parameters, float and integer buffers)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


class Tied(torch.nn.Module):
    """A head tied to the input projection (one Parameter under two names), with a BatchNorm between."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(4, 4, bias=False)
        self.norm = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 4, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(x)))


class Pretrained(torch.nn.Module):
    """A stand-in for a transformers/diffusers model: ``save_pretrained`` writes its state_dict (and records what it
    was given)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = net()
        self.calls: list[tuple[str, dict]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def save_pretrained(self, directory: str, **kwargs) -> str:
        self.calls.append((directory, kwargs))
        if kwargs.get("fail"):
            raise OSError("disk full")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "model.pt")
        torch.save({name: value.clone() for name, value in self.state_dict().items()}, path)
        return path


def dtype_of(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def train_step(ema: ScaledEMA, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(8, 4, dtype=dtype_of(model))).float().pow(2).mean().backward()
    ema.count_samples(8)
    optimizer.step()
    optimizer.zero_grad()


def trained(model: torch.nn.Module, steps: int = 3, **options) -> tuple[ScaledEMA, torch.optim.Optimizer]:
    """A ScaledEMA of ``model`` after ``steps`` steps, then one more training-mode forward without a step: the
    module's weights, running statistics and ``num_batches_tracked`` all differ from the EMA's."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)  # moves every bias
    ema = ScaledEMA(model, optimizer, momentum=0.5, **options)
    torch.manual_seed(1)
    for _ in range(steps):
        train_step(ema, model, optimizer)
    with torch.no_grad():
        model(torch.randn(8, 4, dtype=dtype_of(model)))
    return ema, optimizer


def cloned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in tensors.items()}


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def assert_differs_everywhere(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Every tensor of ``a`` differs from its twin in ``b`` (so a test that they became equal says something)."""
    same = [name for name in a if torch.equal(a[name].to(b[name].dtype), b[name])]
    assert same == [], same


# ------------------------------------------------------------------------------------------- write_into_module
OPTIONS = [{}, {"copy_on_swap": True}, {"offload": True}]


@pytest.mark.parametrize("options", OPTIONS, ids=["pointer-swap", "copy-on-swap", "offload"])
@pytest.mark.parametrize("keep", [0.0, 0.25])
def test_write_into_module_writes_the_ema_into_fp32_tensors(options, keep):
    model = net()
    ema, _ = trained(model, **options)
    before, averages = cloned(model.state_dict()), cloned(ema.ema_state_dict())
    assert_differs_everywhere(before, averages)
    ema.averager.write_into_module(keep)
    for name, value in model.state_dict().items():
        if not value.is_floating_point():  # num_batches_tracked: copied, whatever keep
            expected = averages[name]
        elif keep == 0.0:
            expected = averages[name]
        else:
            expected = torch.lerp(before[name], averages[name], 1.0 - keep)
        assert value.dtype == before[name].dtype and torch.equal(value, expected), name
    assert_equal(cloned(ema.ema_state_dict()), averages)  # the EMA itself is not moved


@pytest.mark.parametrize("keep", [0.0, 0.25])
def test_write_into_module_rounds_an_fp32_ema_once_into_bf16_tensors(keep):
    model = net().to(torch.bfloat16)
    ema, _ = trained(model)
    before, averages = cloned(model.state_dict()), cloned(ema.ema_state_dict())
    assert averages["0.weight"].dtype == torch.float32 and averages["1.running_mean"].dtype == torch.float32
    ema.averager.write_into_module(keep)
    for name, value in model.state_dict().items():
        assert value.dtype == before[name].dtype, name  # written in the module's dtype
        if not value.is_floating_point():
            expected = averages[name]
        else:  # computed in fp32, rounded once
            expected = torch.lerp(before[name].float(), averages[name], 1.0 - keep).to(torch.bfloat16)
        assert torch.equal(value, expected), name


def test_write_into_module_copies_a_float_buffer_holding_inf_whatever_keep():
    model = net()
    model.register_buffer("mask", torch.tensor([0.0, float("-inf")]))  # copied by the EMA, never averaged
    ema, _ = trained(model)
    with torch.no_grad():
        model.mask.fill_(1.0)
    ema.averager.write_into_module(0.25)  # a lerp would give nan for -inf
    assert torch.equal(model.mask, torch.tensor([0.0, float("-inf")]))


def test_write_into_module_reads_the_averages_after_the_update_under_way_has_landed(monkeypatch):
    model = net()
    ema, _ = trained(model, offload=True)
    store = ema.averager.store
    real_flush = store.flush

    def flush():  # the update in flight (side stream, offload thread) lands when waited for
        real_flush()
        for average in store.averages:
            if average.is_floating_point():
                average.fill_(0.5)

    monkeypatch.setattr(store, "flush", flush)
    ema.averager.write_into_module()
    assert all(torch.all(value == 0.5) for value in model.state_dict().values() if value.is_floating_point())


def test_write_into_module_keeps_ties():
    model = Tied()
    ema, _ = trained(model)
    average = ema.ema_state_dict()["embed.weight"].clone()
    assert not torch.equal(model.embed.weight, average)
    ema.averager.write_into_module()
    assert model.head.weight is model.embed.weight and torch.equal(model.embed.weight, average)


def test_write_into_module_lerps_a_tied_tensor_once():
    model = Tied()
    ema, _ = trained(model)
    before, average = model.embed.weight.detach().clone(), ema.ema_state_dict()["embed.weight"].clone()
    ema.averager.write_into_module(0.25)
    assert torch.equal(model.embed.weight, torch.lerp(before, average, 0.75))  # twice would be lerp(lerp(...))
    assert torch.equal(model.state_dict()["head.weight"], torch.lerp(before, average, 0.75))


def test_training_continues_normally_after_write_into_module():
    model = net()
    ema, optimizer = trained(model)
    graph = model(torch.randn(8, 4)).pow(2).mean()  # built on the weights before the write
    ema.averager.write_into_module()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        graph.backward()  # the version counters moved: no gradient of the old weights
    optimizer.zero_grad()
    assert ema.changed_since_seen() == []  # our own write is not "weights loaded by hand"
    written, start, steps = cloned(model.state_dict()), cloned(ema.ema_state_dict()), ema.optimizer_steps
    train_step(ema, model, optimizer)
    assert ema.optimizer_steps == steps + 1 and ema.ema_updates == steps + 1
    after = model.state_dict()
    assert not torch.equal(after["0.weight"], written["0.weight"])  # the optimizer trains the written weights
    weight = 1.0 - ema.momentum_per_update
    for name, average in ema.ema_state_dict().items():
        if average.is_floating_point():
            torch.testing.assert_close(average, torch.lerp(start[name], after[name], weight), rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(average, after[name])


def test_write_into_module_marks_the_module_seen():
    model = net()
    ema, _ = trained(model)
    ema.mark_seen()  # as the callback does when fit ends
    with torch.no_grad():
        model[0].bias.add_(1.0)  # loaded by hand: the EMA is stale for it
    assert ema.changed_since_seen() == ["0.bias"]
    ema.averager.write_into_module()  # overwritten by the EMA: nothing stale is left
    assert ema.changed_since_seen() == []
    assert torch.equal(model[0].bias, ema.ema_state_dict()["0.bias"])


def test_write_into_module_refuses_while_swapped_and_a_bad_keep_and_changes_nothing():
    model = net()
    ema, _ = trained(model)
    before = cloned(model.state_dict())
    with ema.swapped():
        with pytest.raises(RuntimeError, match=r"while the EMA is swapped into the model.*Call swap_out\(\)"):
            ema.averager.write_into_module()
    assert_equal(cloned(model.state_dict()), before)
    for keep in (1.5, -0.1, "half"):
        with pytest.raises(ValueError, match=r"`keep` must be a number in \[0, 1\], got"):
            ema.averager.write_into_module(keep)
    assert_equal(cloned(model.state_dict()), before)


def test_write_into_module_refuses_a_deepspeed_zero3_store():
    model = net()
    ema, _ = trained(model)
    before = cloned(model.state_dict())
    ema.averager.store = ZeroPartitionStore.__new__(ZeroPartitionStore)  # what a ZeRO-3 module's EMA holds
    with pytest.raises(
        RuntimeError,
        match=r"not supported under DeepSpeed ZeRO-3: DeepSpeed keeps fp32 master weights.*"
        r"`lightning_emascale.consolidate_deepspeed_checkpoint`",
    ):
        ema.averager.write_into_module()
    assert_equal(cloned(model.state_dict()), before)


def test_write_into_module_is_refused_by_the_modes_without_a_copy(tmp_path):
    module = torch.nn.ModuleDict({"online": torch.nn.Linear(3, 2)})
    module["teacher"] = torch.nn.Linear(3, 2).requires_grad_(False)
    teachers = ScaledEMA(module, momentum=0.9, teachers={"online": "teacher"})
    with pytest.raises(RuntimeError, match="Teacher mode keeps no separate EMA"):
        teachers.averager.write_into_module()
    post_hoc = ScaledEMA(net(), sigma_rels=[0.05], snapshot_every_samples=8, snapshot_dir=tmp_path)
    with pytest.raises(RuntimeError, match="A post-hoc EMA keeps power EMAs"):
        post_hoc.averager.write_into_module()


# ----------------------------------------------------------------------------------------- save / load weights
@pytest.mark.parametrize("options", OPTIONS, ids=["pointer-swap", "copy-on-swap", "offload"])
def test_fp32_ema_weights_round_trip_exactly(tmp_path, options):
    model = net()
    ema, _ = trained(model, **options)
    path = tmp_path / "ema.safetensors"
    save_ema_weights(ema, path)
    saved = safetensors_torch.load_file(path)
    assert_equal(saved, cloned(ema.ema_state_dict()))  # every tracked tensor, BatchNorm buffers included
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= saved.keys()
    fresh_model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    fresh = ScaledEMA(fresh_model, momentum=0.5, **options)
    assert_differs_everywhere(cloned(fresh.ema_state_dict()), saved)
    training = cloned(fresh_model.state_dict())
    assert load_ema_weights(fresh, path) == {}
    assert_equal(cloned(fresh.ema_state_dict()), saved)
    assert_equal(cloned(fresh_model.state_dict()), training)  # the module's own weights are not touched


def test_channels_last_averages_are_written_contiguous_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).to(memory_format=torch.channels_last)
    ema = ScaledEMA(model, momentum=0.5)
    assert not ema.ema_state_dict()["0.weight"].is_contiguous()  # laid out like the model's weight
    save_ema_weights(ema, tmp_path / "ema.safetensors")
    fresh = ScaledEMA(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)), momentum=0.5)
    load_ema_weights(fresh, tmp_path / "ema.safetensors")
    assert_equal(cloned(fresh.ema_state_dict()), cloned(ema.ema_state_dict()))


def test_a_bf16_model_with_an_fp32_ema_round_trips_exactly_in_the_ema_dtype(tmp_path):
    model = net().to(torch.bfloat16)
    ema, _ = trained(model)
    averages = cloned(ema.ema_state_dict())
    save_ema_weights(ema, tmp_path / "ema.safetensors")  # dtype="ema": float32, lossless
    saved = safetensors_torch.load_file(tmp_path / "ema.safetensors")
    assert saved["0.weight"].dtype == torch.float32 and saved["1.num_batches_tracked"].dtype == torch.int64
    fresh = ScaledEMA(net().to(torch.bfloat16), momentum=0.5)
    load_ema_weights(fresh, tmp_path / "ema.safetensors")
    assert_equal(cloned(fresh.ema_state_dict()), averages)


def test_dtype_model_writes_the_weights_the_model_computes_with_and_a_dtype_casts_floats_only(tmp_path):
    model = net().to(torch.bfloat16)
    ema, _ = trained(model)
    averages = cloned(ema.ema_state_dict())
    save_ema_weights(ema, tmp_path / "model.safetensors", dtype="model")
    saved = safetensors_torch.load_file(tmp_path / "model.safetensors")
    for name, value in saved.items():
        assert value.dtype == model.state_dict()[name].dtype, name
        assert torch.equal(value, averages[name].to(value.dtype)), name
    save_ema_weights(ema, tmp_path / "half.safetensors", dtype=torch.float16)
    half = safetensors_torch.load_file(tmp_path / "half.safetensors")
    assert half["0.weight"].dtype == torch.float16 and half["1.num_batches_tracked"].dtype == torch.int64
    metadata = safetensors_torch.safe_open(tmp_path / "half.safetensors", "pt").metadata()
    assert metadata["lightning_emascale.dtype"] == "float16"
    assert metadata["lightning_emascale.format"] == "ema_weights/1"
    fresh = ScaledEMA(net().to(torch.bfloat16), momentum=0.5)
    load_ema_weights(fresh, tmp_path / "model.safetensors")  # a bf16 file into the fp32 EMA: exact up-cast
    assert torch.equal(fresh.ema_state_dict()["0.weight"], averages["0.weight"].to(torch.bfloat16).float())


def test_tied_tensors_are_written_once_with_their_aliases_and_come_back_tied(tmp_path):
    model = Tied()
    ema, _ = trained(model)
    path = tmp_path / "ema.safetensors"
    save_ema_weights(ema, path, metadata={"step": "3"})
    with safetensors_torch.safe_open(path, "pt") as file:
        assert set(file.keys()) == {"embed.weight", "norm.weight", "norm.bias", "norm.running_mean",
                                    "norm.running_var", "norm.num_batches_tracked"}  # fmt: skip
        assert file.metadata()["head.weight"] == "embed.weight"  # safetensors.torch.save_model's convention
    # safetensors' own loader puts it into a copy of the model, ties kept
    copy = Tied()
    safetensors_torch.load_model(copy, path)
    assert copy.head.weight is copy.embed.weight
    assert_equal(cloned(copy.state_dict()), cloned(ema.ema_state_dict()))
    # and ours into the EMA: one tensor under both names
    fresh = ScaledEMA(Tied(), momentum=0.5)
    assert load_ema_weights(fresh, path) == {"step": "3"}
    loaded = fresh.ema_state_dict()
    assert loaded["head.weight"] is loaded["embed.weight"]
    assert_equal(cloned(loaded), cloned(ema.ema_state_dict()))


def test_a_tied_tensor_is_read_under_any_of_its_names_and_tied_copies_must_agree(tmp_path):
    model = Tied()
    ema, _ = trained(model)
    weights = {name: value.clone() for name, value in ema.ema_state_dict().items()}
    only_alias = {name: value for name, value in weights.items() if name != "embed.weight"}
    safetensors_torch.save_file(only_alias, tmp_path / "alias.safetensors")
    fresh = ScaledEMA(Tied(), momentum=0.5)
    load_ema_weights(fresh, tmp_path / "alias.safetensors")
    assert torch.equal(fresh.ema_state_dict()["embed.weight"], weights["head.weight"])
    safetensors_torch.save_file(weights, tmp_path / "both.safetensors")  # two equal copies: fine
    load_ema_weights(fresh, tmp_path / "both.safetensors")
    weights["head.weight"] = weights["head.weight"] + 1
    safetensors_torch.save_file(weights, tmp_path / "differ.safetensors")
    other = ScaledEMA(Tied(), momentum=0.5)
    start = cloned(other.ema_state_dict())
    with pytest.raises(ValueError, match=r"differ.safetensors' holds different values for 'embed.weight' and"
                                         r" \['head.weight'\], which are one tied tensor"):  # fmt: skip
        load_ema_weights(other, tmp_path / "differ.safetensors")
    assert_equal(cloned(other.ema_state_dict()), start)


def test_a_file_of_plain_model_weights_loads_into_the_ema(tmp_path):
    source = Tied()
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(1.0)
    safetensors_torch.save_model(source, tmp_path / "model.safetensors")  # drops the alias, records it
    ema = ScaledEMA(Tied(), momentum=0.5)
    load_ema_weights(ema, tmp_path / "model.safetensors")
    assert_equal(cloned(ema.ema_state_dict()), cloned(source.state_dict()))


def test_tensors_left_out_of_the_ema_are_not_written_and_are_skipped_when_read(tmp_path):
    model = net()
    ema, _ = trained(model, exclude=["2"])
    save_ema_weights(ema, tmp_path / "ema.safetensors")
    assert "2.weight" not in safetensors_torch.load_file(tmp_path / "ema.safetensors")
    safetensors_torch.save_file(cloned(model.state_dict()), tmp_path / "full.safetensors")
    load_ema_weights(ema, tmp_path / "full.safetensors")  # '2.*' left out of the EMA: skipped
    assert torch.equal(ema.ema_state_dict()["0.weight"], model[0].weight)


def test_the_callback_like_holder_of_a_scaled_ema_is_taken(tmp_path):
    model = net()
    ema, _ = trained(model)
    holder = SimpleNamespace(scaled_ema=ema)  # what EMAScalingCallback offers
    save_ema_weights(holder, tmp_path / "ema.safetensors")
    fresh = ScaledEMA(net(), momentum=0.5)
    load_ema_weights(SimpleNamespace(scaled_ema=fresh), tmp_path / "ema.safetensors")
    assert_equal(cloned(fresh.ema_state_dict()), cloned(ema.ema_state_dict()))

    class NotYet:
        @property
        def scaled_ema(self):
            raise RuntimeError("The EMA does not exist yet: it is created when `trainer.fit` starts.")

    with pytest.raises(RuntimeError, match="does not exist yet"):  # the callback's own words
        save_ema_weights(NotYet(), tmp_path / "never.safetensors")
    with pytest.raises(TypeError, match=r"`ema` must be a ScaledEMA or an object holding one as `scaled_ema`.*"
                                        r"got Sequential"):  # fmt: skip
        save_ema_weights(model, tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()


def test_metadata_is_stored_and_returned_and_checked(tmp_path):
    ema, _ = trained(net())
    given = {"step": "3", "run": "abc"}
    save_ema_weights(ema, tmp_path / "ema.safetensors", metadata=given)
    assert given == {"step": "3", "run": "abc"}  # the caller's dict is not changed
    assert load_ema_weights(ScaledEMA(net(), momentum=0.5), tmp_path / "ema.safetensors") == given
    for bad, error in [
        ({"step": 3}, r"`metadata` must be a dict of str -> str \(safetensors stores text only\), got 'step': 3"),
        (["step"], r"`metadata` must be a dict of str -> str, got list"),
        ({"lightning_emascale.format": "x"}, r"keys \['lightning_emascale.format'\] are reserved"),
        ({"0.weight": "x"}, r"keys \['0.weight'\] are reserved: .* the module's tensor names"),
    ]:
        with pytest.raises(ValueError, match=error):
            save_ema_weights(ema, tmp_path / "bad.safetensors", metadata=bad)
    with pytest.raises(ValueError, match=r"`dtype` must be 'ema', 'model' or a floating-point torch.dtype, got 'fp32'"):
        save_ema_weights(ema, tmp_path / "bad.safetensors", dtype="fp32")
    with pytest.raises(ValueError, match=r"got torch.int32"):
        save_ema_weights(ema, tmp_path / "bad.safetensors", dtype=torch.int32)
    assert not (tmp_path / "bad.safetensors").exists()


def _refused_load(ema: ScaledEMA, path, error, match) -> None:
    """``load_ema_weights`` raises ``error`` matching ``match`` and leaves the EMA as it was."""
    start = cloned(ema.ema_state_dict())
    with pytest.raises(error, match=match):
        load_ema_weights(ema, path)
    assert_equal(cloned(ema.ema_state_dict()), start)


def test_every_load_refusal_names_the_file_and_changes_nothing(tmp_path):
    ema, _ = trained(net())
    weights = cloned(ema.ema_state_dict())

    def file(name: str, tensors: dict) -> str:
        path = str(tmp_path / name)
        safetensors_torch.save_file(tensors, path)
        return path

    missing = file("missing.safetensors", {k: v for k, v in weights.items() if not k.startswith("2.")})
    _refused_load(ema, missing, KeyError, r"missing.safetensors' does not match the module's EMA: missing \['2.weight',"
                                          r" '2.bias'\], unexpected \[\].*another model")  # fmt: skip
    extra = file("extra.safetensors", {**weights, "3.weight": torch.zeros(2)})
    _refused_load(ema, extra, KeyError, r"extra.safetensors' does not match .* unexpected \['3.weight'\]")
    shape = file("shape.safetensors", {**weights, "0.weight": torch.zeros(4, 5)})
    _refused_load(ema, shape, ValueError, r"shape.safetensors': The saved EMA of '0.weight' has shape \(4, 5\), the"
                                          r" model's is \(4, 4\)")  # fmt: skip
    kind = file("kind.safetensors", {**weights, "1.num_batches_tracked": torch.tensor(1.0)})
    _refused_load(ema, kind, TypeError, r"kind.safetensors': The saved EMA of '1.num_batches_tracked' has dtype")
    inf = file("inf.safetensors", {**weights, "0.bias": torch.full((4,), float("inf"))})
    _refused_load(ema, inf, ValueError, r"inf.safetensors': The saved EMA of '0.bias' \(a parameter\) is non-finite")
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    _refused_load(ema, tmp_path / "text.safetensors", ValueError, r"text.safetensors' is not a safetensors file")
    _refused_load(ema, tmp_path / "absent.safetensors", FileNotFoundError, r"no file at '.*absent.safetensors'")
    good = file("good.safetensors", weights)
    with ema.swapped():
        _refused_load(ema, good, RuntimeError, r"good.safetensors'\) while the EMA is swapped into the module")


def test_the_modes_without_a_copy_and_sharded_modules_are_refused(tmp_path, monkeypatch):
    module = torch.nn.ModuleDict({"online": torch.nn.Linear(3, 2)})
    module["teacher"] = torch.nn.Linear(3, 2).requires_grad_(False)
    teachers = ScaledEMA(module, momentum=0.9, teachers={"online": "teacher"})
    for function in (save_ema_weights, load_ema_weights, save_ema_pretrained):
        with pytest.raises(RuntimeError, match=rf"{function.__name__} needs a Polyak EMA .* this ScaledEMA is in"
                                               r" teacher mode .*Teacher mode keeps no separate EMA"):  # fmt: skip
            function(teachers, tmp_path / "x")
    post_hoc = ScaledEMA(net(), sigma_rels=[0.05], snapshot_every_samples=8, snapshot_dir=tmp_path / "snapshots")
    with pytest.raises(RuntimeError, match=r"is a post-hoc EMA of sigma_rel \[0.05\]. A post-hoc EMA keeps power"):
        save_ema_weights(post_hoc, tmp_path / "x")
    ema, _ = trained(net())
    monkeypatch.setattr(ema.layout, "is_sharded", True)
    for function in (save_ema_weights, load_ema_weights, save_ema_pretrained):
        with pytest.raises(NotImplementedError, match=rf"{function.__name__} is not supported for a sharded module"
                                                      r".*`save_distributed_checkpoint=False`.*"
                                                      r"consolidate_deepspeed_checkpoint"):  # fmt: skip
            function(ema, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_without_safetensors_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    ema, _ = trained(net())
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    for function in (save_ema_weights, load_ema_weights):
        with pytest.raises(ImportError, match=r"`pip install safetensors` \(or `pip install"
                                              r" lightning-emascale\[export\]`\)"):  # fmt: skip
            function(ema, tmp_path / "ema.safetensors")


# -------------------------------------------------------------------------------------------- save_pretrained
@pytest.mark.parametrize("options", OPTIONS, ids=["pointer-swap", "copy-on-swap", "offload"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_ema_pretrained_writes_the_ema_and_restores_the_training_weights(tmp_path, options, dtype):
    model = Pretrained().to(dtype)
    ema, _ = trained(model, **options)
    training, storage = cloned(model.state_dict()), [t.data_ptr() for t in model.state_dict().values()]
    averages = cloned(ema.ema_state_dict())
    assert_differs_everywhere(training, averages)
    returned = save_ema_pretrained(ema, str(tmp_path / "out"), max_shard_size="1GB")
    assert returned == str(tmp_path / "out" / "model.pt")  # what save_pretrained returns
    assert model.calls == [(str(tmp_path / "out"), {"max_shard_size": "1GB"})]  # the keyword arguments passed on
    written = torch.load(tmp_path / "out" / "model.pt")
    for name, value in written.items():  # the EMA, in the module's dtype
        assert value.dtype == training[name].dtype and torch.equal(value, averages[name].to(value.dtype)), name
    assert_equal(cloned(model.state_dict()), training)  # the training weights, bit for bit
    assert [t.data_ptr() for t in model.state_dict().values()] == storage
    assert not ema.is_swapped


def test_save_ema_pretrained_restores_the_training_weights_when_saving_fails(tmp_path):
    model = Pretrained()
    ema, _ = trained(model)
    training = cloned(model.state_dict())
    with pytest.raises(OSError, match="disk full"):
        save_ema_pretrained(ema, str(tmp_path / "out"), fail=True)
    assert_equal(cloned(model.state_dict()), training)
    assert not ema.is_swapped


def test_save_ema_pretrained_inside_a_swap_saves_what_the_module_holds_and_stays_swapped(tmp_path):
    model = Pretrained()
    ema, _ = trained(model)
    averages = cloned(ema.ema_state_dict())
    with ema.swapped():
        save_ema_pretrained(ema, str(tmp_path / "out"))
        assert ema.is_swapped
    assert_equal(torch.load(tmp_path / "out" / "model.pt"), averages)


def test_save_ema_pretrained_refuses_a_module_without_save_pretrained(tmp_path):
    model = net()
    ema, _ = trained(model)
    with pytest.raises(TypeError, match=r"needs a module with a `save_pretrained` method .* and Sequential has none:"
                                        r" write a safetensors file with `save_ema_weights"):  # fmt: skip
        save_ema_pretrained(ema, str(tmp_path / "out"))
    assert not ema.is_swapped and not (tmp_path / "out").exists()
