"""``update_bn``: the BatchNorm statistics of the EMA weights, against ``torch.optim.swa_utils.update_bn`` on a copy
of the model holding the EMA weights; the training weights, buffers, training flags and momenta come back exactly;
every refusal changes nothing. No Trainer."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_emascale import ScaledEMA
from lightning_emascale.batchnorm import update_bn

STATS = ("running_mean", "running_var", "num_batches_tracked")


def bn_net(dropout: bool = False) -> torch.nn.Sequential:
    """Two BatchNorm layers (the second with its own momentum), optionally a dropout before the second."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.5) if dropout else torch.nn.Identity(),
        torch.nn.Linear(8, 8),
        torch.nn.BatchNorm1d(8, momentum=0.3),
        torch.nn.Linear(8, 1),
    )


def conv_net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16, 1)
    )


def data(shape: tuple[int, ...] = (4,), n: int = 40) -> TensorDataset:
    generator = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(n, *shape, generator=generator) * 3 + 1, torch.randn(n, 1, generator=generator))


def trained(model: torch.nn.Module, shape: tuple[int, ...] = (4,), **options) -> ScaledEMA:
    """A ScaledEMA of ``model`` after a few steps: the EMA weights and statistics differ from the training ones."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = ScaledEMA(model, optimizer, momentum=0.7, **options)
    for x, y in DataLoader(data(shape), batch_size=8):
        torch.nn.functional.mse_loss(model(x), y).backward()
        ema.count_samples(len(x))
        optimizer.step()
        optimizer.zero_grad()
    return ema


def reference(model: torch.nn.Module, ema: ScaledEMA, loader, strip_dropout: bool = False) -> dict[str, torch.Tensor]:
    """``torch.optim.swa_utils.update_bn`` on a plain copy of ``model`` holding the EMA weights."""
    twin = copy.deepcopy(model)
    twin.load_state_dict(ema.ema_state_dict())
    if strip_dropout:  # torch's update_bn puts the whole model in training mode; ours runs dropout as at inference
        for index, layer in enumerate(twin):
            if isinstance(layer, torch.nn.Dropout):
                twin[index] = torch.nn.Identity()
    torch.optim.swa_utils.update_bn(loader, twin)
    return twin.state_dict()


def snapshot(model: torch.nn.Module, ema: ScaledEMA) -> dict:
    """Everything update_bn must give back as it was (and the EMA, for the refusals)."""
    return {
        "training": {name: value.clone() for name, value in model.state_dict().items()},
        "storage": [value.data_ptr() for value in model.state_dict().values()],
        "flags": [layer.training for layer in model.modules()],
        "momenta": [
            layer.momentum
            for layer in model.modules()
            if isinstance(layer, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d)
        ],
        "ema": {name: value.clone() for name, value in ema.ema_state_dict().items()},
        "swapped": ema.is_swapped,
    }


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def assert_training_state_kept(model: torch.nn.Module, ema: ScaledEMA, before: dict) -> None:
    after = snapshot(model, ema)
    assert_equal(after["training"], before["training"])  # bit for bit
    assert after["storage"] == before["storage"]
    assert after["flags"] == before["flags"]
    assert after["momenta"] == before["momenta"]
    assert not after["swapped"]


def is_statistic(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in STATS


# ------------------------------------------------------------------------------------------------- the numbers
@pytest.mark.parametrize("copy_on_swap", [False, True], ids=["pointer-swap", "copy-on-swap"])
@pytest.mark.parametrize("training", [True, False], ids=["train-mode", "eval-mode"])
def test_update_bn_gives_torchs_statistics_of_the_ema_weights_and_keeps_the_training_state(copy_on_swap, training):
    model = bn_net()
    ema = trained(model, copy_on_swap=copy_on_swap)
    model.train(training)
    loader = DataLoader(data(), batch_size=8)  # (inputs, targets) batches: the default forward takes batch[0]
    expected = reference(model, ema, loader)
    before = snapshot(model, ema)
    assert not torch.equal(before["ema"]["1.running_mean"], expected["1.running_mean"])  # the update changes them
    assert update_bn(loader, ema) == 5
    ema_after = ema.ema_state_dict()
    for name, value in ema_after.items():
        if is_statistic(name):
            assert torch.equal(value, expected[name]), name  # exactly torch's
        else:
            assert torch.equal(value, before["ema"][name]), name  # the EMA of the weights is not touched
    assert int(ema_after["5.num_batches_tracked"]) == 5
    assert_training_state_kept(model, ema, before)


def test_update_bn_of_a_conv_net_on_a_list_of_tensors():
    model = conv_net()
    ema = trained(model, shape=(3, 4, 4))
    loader = [x for x, _ in DataLoader(data((3, 4, 4)), batch_size=10)]  # tensor batches: module(batch)
    expected = reference(model, ema, loader)
    before = snapshot(model, ema)
    assert update_bn(loader, ema) == 4
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(ema.ema_state_dict()[name], expected[name]), name
    assert_training_state_kept(model, ema, before)


def test_max_batches_stops_early():
    model = bn_net()
    ema = trained(model)
    batches = [x for x, _ in DataLoader(data(), batch_size=8)]
    expected = reference(model, ema, batches[:2])
    assert update_bn(batches, ema, max_batches=2) == 2
    for name, value in ema.ema_state_dict().items():
        if is_statistic(name):
            assert torch.equal(value, expected[name]), name


def test_dict_batches_run_as_keyword_arguments_and_a_forward_of_ones_own():
    class Keywords(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = bn_net()

        def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
            return self.net(inputs)

    model = Keywords()
    ema = trained(model)
    batches = [{"inputs": x, "labels": y} for x, y in DataLoader(data(), batch_size=8)]
    expected = reference(model, ema, [batch["inputs"] for batch in batches])
    update_bn(batches, ema)
    for name, value in ema.ema_state_dict().items():
        if is_statistic(name):
            assert torch.equal(value, expected[name]), name
    doubled = reference(model, ema, [batch["inputs"] * 2 for batch in batches])
    assert update_bn(batches, ema, forward=lambda batch: model(batch["inputs"] * 2)) == 5
    for name, value in ema.ema_state_dict().items():
        if is_statistic(name):
            assert torch.equal(value, doubled[name]), name
    assert not torch.equal(doubled["net.1.running_mean"], expected["net.1.running_mean"])


def test_dropout_runs_as_at_inference_and_the_result_is_deterministic():
    model = bn_net(dropout=True)
    ema = trained(model)
    loader = DataLoader(data(), batch_size=8)
    expected = reference(model, ema, loader, strip_dropout=True)
    update_bn(loader, ema)
    first = {name: value.clone() for name, value in ema.ema_state_dict().items()}
    update_bn(loader, ema)  # recomputed from scratch: the same
    for name, value in ema.ema_state_dict().items():
        assert torch.equal(value, first[name]), name
        if is_statistic(name):
            assert torch.equal(value, expected[name]), name


def test_an_untracked_num_batches_tracked_is_left_alone():
    model = bn_net()
    ema = trained(model, exclude=["1.num_batches_tracked", "5.num_batches_tracked"])
    loader = DataLoader(data(), batch_size=8)
    expected = reference(model, ema, loader)
    update_bn(loader, ema)
    assert "1.num_batches_tracked" not in ema.ema_state_dict()
    assert torch.equal(ema.ema_state_dict()["1.running_var"], expected["1.running_var"])


def test_the_callback_like_holder_of_a_scaled_ema_is_taken():
    model = bn_net()
    ema = trained(model)
    loader = DataLoader(data(), batch_size=8)
    expected = reference(model, ema, loader)
    update_bn(loader, SimpleNamespace(scaled_ema=ema))
    assert torch.equal(ema.ema_state_dict()["5.running_mean"], expected["5.running_mean"])


# ---------------------------------------------------------------------------------------------------- refusals
def test_a_forward_that_raises_midway_leaves_everything_as_it_was():
    model = bn_net()
    ema = trained(model)
    before = snapshot(model, ema)

    def forward(batch):
        if forward.calls == 2:
            raise RuntimeError("out of memory")
        forward.calls += 1
        model(batch[0])

    forward.calls = 0
    with pytest.raises(RuntimeError, match="out of memory"):
        update_bn(DataLoader(data(), batch_size=8), ema, forward=forward)
    assert forward.calls == 2  # it ran, and changed the module's statistics, before raising
    assert_training_state_kept(model, ema, before)
    assert_equal({k: v.clone() for k, v in ema.ema_state_dict().items()}, before["ema"])


def _refused(model, ema, call, error, match) -> None:
    before = snapshot(model, ema)
    with pytest.raises(error, match=match):
        call()
    assert_training_state_kept(model, ema, before)
    assert_equal({k: v.clone() for k, v in ema.ema_state_dict().items()}, before["ema"])


def test_every_refusal_says_why_and_changes_nothing(tmp_path, monkeypatch):
    model = bn_net()
    ema = trained(model)
    loader = DataLoader(data(), batch_size=8)
    _refused(
        model,
        ema,
        lambda: update_bn([], ema),
        ValueError,
        r"`loader` yielded no batch, so there are no statistics to compute.*the EMA was left as it was",
    )
    _refused(model, ema, lambda: update_bn(DataLoader(data(n=0), batch_size=8), ema), ValueError, r"yielded no batch")
    _refused(
        model,
        ema,
        lambda: update_bn(5, ema),
        TypeError,
        r"`loader` must be an iterable of batches \(a DataLoader\), got int",
    )
    _refused(
        model,
        ema,
        lambda: update_bn(["text"], ema),
        TypeError,
        r"default `forward` runs the module on a tensor batch.* got a str: pass `forward=`",
    )
    _refused(
        model,
        ema,
        lambda: update_bn(loader, ema, forward="model"),
        TypeError,
        r"`forward` must be a callable of one batch that runs the module, or None, got 'model'",
    )
    for bad in (0, -1, 1.5):
        _refused(
            model,
            ema,
            lambda bad=bad: update_bn(loader, ema, max_batches=bad),
            ValueError,
            r"`max_batches` must be a positive integer or None",
        )
    with ema.swapped():
        with pytest.raises(RuntimeError, match=r"update_bn\(\) swaps the EMA in itself: call it outside a swapped"):
            update_bn(loader, ema)
    monkeypatch.setattr(ema.layout, "is_sharded", True)
    _refused(
        model,
        ema,
        lambda: update_bn(loader, ema),
        NotImplementedError,
        r"update_bn is not supported for a sharded module .*consolidate_deepspeed_checkpoint.* call update_bn"
        r" on a ScaledEMA of it",
    )
    with pytest.raises(TypeError, match=r"`ema` must be a ScaledEMA or an object holding one"):
        update_bn(loader, model)


def test_a_module_without_batchnorm_statistics_is_refused():
    for model in (
        torch.nn.Sequential(torch.nn.Linear(4, 2)),
        torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2, track_running_stats=False)),
    ):
        ema = ScaledEMA(model, momentum=0.9)
        _refused(
            model,
            ema,
            lambda ema=ema: update_bn([torch.randn(4, 4)], ema),
            ValueError,
            r"Sequential has no BatchNorm layer with running statistics .*`track_running_stats=True`",
        )


def test_batchnorm_statistics_left_out_of_the_ema_are_refused():
    model = bn_net()
    ema = trained(model, exclude=["5"])
    _refused(
        model,
        ema,
        lambda: update_bn(DataLoader(data(), batch_size=8), ema),
        ValueError,
        r"the EMA does not track '5.running_mean', '5.running_var' \(left out by `include`/`exclude`\): there is"
        r" no EMA copy to hold them",
    )


def test_the_modes_without_a_copy_are_refused(tmp_path):
    module = torch.nn.ModuleDict({"online": bn_net(), "teacher": bn_net().requires_grad_(False)})
    teachers = ScaledEMA(module, momentum=0.9, teachers={"online": "teacher"})
    with pytest.raises(RuntimeError, match=r"update_bn needs a Polyak EMA .*Teacher mode keeps no separate EMA"):
        update_bn([torch.randn(4, 4)], teachers)
    post_hoc = ScaledEMA(bn_net(), sigma_rels=[0.05], snapshot_every_samples=8, snapshot_dir=tmp_path)
    with pytest.raises(RuntimeError, match=r"update_bn needs a Polyak EMA .*A post-hoc EMA keeps power EMAs"):
        update_bn([torch.randn(4, 4)], post_hoc)
