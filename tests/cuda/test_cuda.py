"""The CUDA paths: no host sync per step, the side stream, the offloaded EMA and the zero-copy swap on a GPU.

These need a CUDA device and are skipped without one (CI has none); they are run on a GPU machine by hand:
``python -m pytest tests/cuda -v``. Each compares against the in-line update or the CPU, or asserts that the
sync detector itself fires, so a pass says something.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from lightning_emascale import ScaledEMA

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@contextmanager
def no_host_sync() -> Iterator[None]:
    """Every synchronizing CUDA call inside the block raises (``torch.cuda.set_sync_debug_mode``)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


class Net(torch.nn.Module):
    def __init__(self, width: int = 512) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(32, width), torch.nn.BatchNorm1d(width), torch.nn.ReLU(), torch.nn.Linear(width, width)
        )
        self.online = torch.nn.Linear(width, 8)
        self.teacher = copy.deepcopy(self.online).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.body(x)
        return self.online(hidden) + self.teacher(hidden)


def _train(ema_kwargs: dict, steps: int = 6, dtype: torch.dtype = torch.float32, width: int = 512, tmp_path=None):
    torch.manual_seed(0)
    model = Net(width).cuda().to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if "sigma_rels" in ema_kwargs:
        ema_kwargs = {**ema_kwargs, "snapshot_every_samples": 10**9, "snapshot_dir": tmp_path}
    ema = ScaledEMA(model, optimizer, base_batch_size=64, optimizer_rule="sgd", **ema_kwargs)
    batches = [torch.randn(128, 32, device="cuda", dtype=dtype) for _ in range(steps)]
    torch.cuda.synchronize()
    with no_host_sync():
        for x in batches:
            model(x).float().pow(2).mean().backward()
            ema.count_samples(128)
            optimizer.step()
            optimizer.zero_grad()
    return model, ema


def test_the_sync_detector_fires():
    with no_host_sync(), pytest.raises(RuntimeError, match="synchroniz"):
        torch.ones(1, device="cuda").item()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"side_stream": False},
        {"skip_non_finite": True},
        {"flat_parameters": True},
        {"offload": True},
        {"teachers": {"online": "teacher"}},
        {"sigma_rels": (0.05, 0.1)},
        {"momentum_schedule": "cosine", "final_momentum": 1.0, "total_samples": 10_000},
    ],
    ids=lambda kwargs: ",".join(kwargs) or "default",
)
def test_a_training_loop_with_the_ema_never_syncs_the_host(kwargs, tmp_path):
    _, ema = _train({"momentum": 0.99, **kwargs} if "sigma_rels" not in kwargs else kwargs, tmp_path=tmp_path)
    assert ema.ema_updates == 6 and ema.kappa == 2.0


def test_the_bf16_model_with_an_fp32_ema_never_syncs_the_host():
    _, ema = _train({"momentum": 0.99}, dtype=torch.bfloat16)
    assert ema.averager.averages[0].dtype == torch.float32 and ema.ema_updates == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_side_stream_update_equals_the_in_line_update(dtype):
    side_model, side = _train({"momentum": 0.9}, steps=20, dtype=dtype, width=2048)
    line_model, line = _train({"momentum": 0.9, "side_stream": False}, steps=20, dtype=dtype, width=2048)
    assert side.averager.store.side_stream._stream is not None  # the update did run on the side stream
    assert line.averager.store.side_stream._stream is None
    for (name, fast), slow in zip(side.ema_state_dict().items(), line.ema_state_dict().values()):
        assert fast.is_floating_point() is False or bool(fast.isfinite().all()), name  # a run that trained
        assert torch.equal(fast, slow), name
    for (name, fast), slow in zip(side_model.state_dict().items(), line_model.state_dict().values()):
        assert torch.equal(fast, slow), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gpu_update_equals_the_readable_reference_bit_for_bit(dtype):
    from lightning_emascale._averager import Update
    from lightning_emascale._polyak import PolyakEMA
    from lightning_emascale._store import reference_update

    torch.manual_seed(0)
    model = (
        torch.nn.Sequential(
            torch.nn.Conv2d(3, 64, 3), torch.nn.BatchNorm2d(64), torch.nn.Linear(1000, 1000), torch.nn.Linear(300, 7)
        )
        .cuda()
        .to(dtype)
    )
    model[0].to(memory_format=torch.channels_last)
    state = PolyakEMA.from_module(model)
    reference = [average.clone() for average in state.averages]
    for step in range(4):
        with torch.no_grad():
            for tensor in state.tracked:
                tensor.add_(torch.randn_like(tensor) if tensor.is_floating_point() else 1)
        state.update(Update(0.9 ** (step + 1)))
        reference_update(reference, state.tracked, 0.9 ** (step + 1))
    for name, fast, slow in zip(state.names, state.averages, reference):
        assert torch.equal(fast, slow), name


def test_the_offloaded_ema_lives_on_the_cpu_and_matches_the_gpu_one():
    _, gpu = _train({"momentum": 0.9}, steps=10)
    _, offloaded = _train({"momentum": 0.9, "offload": True}, steps=10)
    for (name, on_gpu), on_cpu in zip(gpu.ema_state_dict().items(), offloaded.ema_state_dict().values()):
        assert on_cpu.device.type == "cpu", name
        torch.testing.assert_close(on_cpu, on_gpu.cpu(), rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    ("dtype", "copy_on_swap", "extra"),
    [(torch.float32, False, 0.0), (torch.bfloat16, False, 1.0), (torch.float32, True, 1.0)],
)
def test_the_swap_allocates_only_what_it_must_on_the_gpu(dtype, copy_on_swap, extra):
    """Zero-copy where the dtypes match; a bf16 model gets the cast of each parameter; copy_on_swap one copy."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)]).cuda().to(dtype)
    ema = ScaledEMA(model, momentum=0.9, copy_on_swap=copy_on_swap)
    raw = [p.detach().clone() for p in model.parameters()]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with ema.swapped():
        during = torch.cuda.max_memory_allocated() - before
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, ema.ema_state_dict()[name].to(dtype)), name
    assert during == pytest.approx(extra * weights, rel=0.01, abs=4096)
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), raw))  # restored bit-exactly


def test_a_lightning_fit_on_the_gpu_adds_no_host_sync_in_the_ema_hooks(tmp_path, monkeypatch):
    import lightning as L

    from lightning_emascale import EMAScalingCallback
    from lightning_emascale import core as core_module

    def guarded(method):
        def run(*args, **kwargs):
            with no_host_sync():
                return method(*args, **kwargs)

        return run

    for name in ("_before_optimizer_step", "_after_optimizer_step", "count_samples", "end_step"):
        monkeypatch.setattr(core_module.ScaledEMA, name, guarded(getattr(core_module.ScaledEMA, name)))
    for name in ("on_train_batch_start", "on_train_batch_end"):
        monkeypatch.setattr(EMAScalingCallback, name, guarded(getattr(EMAScalingCallback, name)))

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.BatchNorm1d(256), torch.nn.Linear(256, 1))

        def training_step(self, batch, _):
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def validation_step(self, batch, _):
            self.log("val", torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    data = torch.utils.data.TensorDataset(torch.randn(512, 16), torch.randn(512, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=64)
    results = []
    for side_stream in (True, False):
        torch.manual_seed(0)
        module = Module()
        callback = EMAScalingCallback(momentum=0.9, base_batch_size=32, optimizer_rule="sgd", side_stream=side_stream)
        trainer = L.Trainer(
            accelerator="gpu", devices=1, max_epochs=2, callbacks=[callback], log_every_n_steps=1000,
            enable_checkpointing=False, logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(module, loader, loader)
        assert callback.ema_updates == 16 and callback.scaled_ema.kappa == 2.0
        results.append({name: tensor.cpu() for name, tensor in callback.ema_state_dict().items()})
    for name in results[0]:
        assert not results[0][name].is_floating_point() or bool(results[0][name].isfinite().all()), name
        assert torch.equal(results[0][name], results[1][name]), name
