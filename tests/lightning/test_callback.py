import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import StepRecorder, TinyModel, make_trainer, reference_ema
from lightning.pytorch.strategies import FSDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_emascale import EMAScalingCallback


def _initial(model):
    return {k: v.detach().clone() for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()}


def _assert_ema_matches(callback, expected, atol=1e-6):
    ema = callback.ema_state_dict()
    assert set(ema) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(ema[name].double(), value, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize(("accumulate", "batch_size", "base"), [(1, 4, 4), (3, 4, 4), (2, 4, 16), (1, 7, 4)])
def test_kappa_and_ema_follow_the_batches_seen(accumulate, batch_size, base):
    L.seed_everything(0)
    model = TinyModel(n_samples=30, batch_size=batch_size)  # 30 is not a multiple: short last batch
    initial = _initial(model)
    callback = EMAScalingCallback(momentum=0.9, base_batch_size=base)
    recorder = StepRecorder()
    make_trainer([callback, recorder], accumulate_grad_batches=accumulate, max_epochs=2).fit(model)

    assert callback.samples_seen == 60 == sum(recorder.batch_sizes)
    assert callback.optimizer_steps == len(recorder.batch_sizes)
    assert callback.kappa == pytest.approx(recorder.batch_sizes[-1] / base)
    assert recorder.batch_sizes[0] == batch_size * accumulate
    assert min(recorder.batch_sizes) < batch_size * accumulate  # the short last step got a smaller kappa
    _assert_ema_matches(callback, reference_ema(initial, recorder, 0.9, base))


def test_base_batch_size_defaults_to_the_first_step():
    model = TinyModel(n_samples=32, batch_size=8)
    callback = EMAScalingCallback(momentum=0.9)
    make_trainer([callback], accumulate_grad_batches=2).fit(model)
    assert callback.resolved_base_batch_size == 16
    assert callback.kappa == 1.0 and callback.ema_momentum == pytest.approx(0.9)


def test_integer_buffers_copied_and_bn_stats_averaged():
    model = TinyModel()
    callback = EMAScalingCallback(momentum=0.5, base_batch_size=4)
    make_trainer([callback]).fit(model)
    ema = callback.ema_state_dict()
    assert ema["net.1.num_batches_tracked"].item() == model.net[1].num_batches_tracked.item() == 8
    assert ema["net.1.running_mean"].dtype == torch.float32
    assert not torch.equal(ema["net.1.running_mean"], model.net[1].running_mean)


def test_ema_is_not_on_the_module_nor_in_its_state_dict():
    model = TinyModel()
    keys = set(model.state_dict())
    callback = EMAScalingCallback(momentum=0.9)
    make_trainer([callback]).fit(model)
    assert set(model.state_dict()) == keys
    assert all(not isinstance(v, EMAScalingCallback) for v in vars(model).values())


class _EvalSpy(L.Callback):
    def __init__(self, ema):
        self.ema = ema
        self.seen = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        weight = pl_module.net[0].weight.detach().clone()
        swapped = self.ema.scaled_ema.ema_updates > 0
        assert self.ema.scaled_ema.is_swapped == swapped
        expected = self.ema.ema_state_dict() if swapped else self.ema.scaled_ema.raw_state_dict()
        expected = expected["net.0.weight"]
        assert torch.equal(weight, expected)
        self.seen.append(swapped)


def test_validation_runs_on_the_ema_and_restores_the_raw_weights_exactly():
    model = TinyModel()
    callback = EMAScalingCallback(momentum=0.9)
    spy = _EvalSpy(callback)
    recorder = StepRecorder()
    trainer = make_trainer([callback, spy, recorder], max_epochs=2, limit_val_batches=2, num_sanity_val_steps=1)
    trainer.fit(model)
    assert spy.seen[0] is False  # the sanity check sees the raw weights (no EMA update yet)
    assert spy.seen[1:] == [True] * 4
    for name, value in recorder.weights[-1].items():  # raw weights after the last step, untouched by the swaps
        assert torch.equal(dict(model.state_dict())[name], value), name
    # test and predict swap too, and restore
    raw = model.net[0].weight.detach().clone()
    trainer.test(model, dataloaders=model.val_dataloader(), verbose=False)
    assert torch.equal(model.net[0].weight, raw)
    predictions = trainer.predict(model, dataloaders=DataLoader(model.x[:4], batch_size=4))
    model.eval()
    with callback.ema_weights(), torch.no_grad():
        expected = model(model.x[:4])
    torch.testing.assert_close(predictions[0], expected)
    assert torch.equal(model.net[0].weight, raw)


def test_evaluate_with_ema_false_keeps_raw_weights():
    model = TinyModel()
    callback = EMAScalingCallback(momentum=0.9, evaluate_with_ema=False)
    trainer = make_trainer([callback])
    trainer.fit(model)
    model.eval()
    with torch.no_grad():
        raw_out = model(model.x[:4])
    predictions = trainer.predict(model, dataloaders=DataLoader(model.x[:4], batch_size=4))
    torch.testing.assert_close(predictions[0], raw_out)


class _BothMetrics(TinyModel):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        ema = next(c for c in self.trainer.callbacks if isinstance(c, EMAScalingCallback))
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))
        self.log("val_loss_ema", torch.nn.functional.mse_loss(ema.functional_call(self, (x,)), y))


def test_functional_call_gives_raw_and_ema_metrics_in_one_step():
    model = _BothMetrics()
    callback = EMAScalingCallback(momentum=0.9, evaluate_with_ema=False)
    trainer = make_trainer([callback], limit_val_batches=2)
    trainer.fit(model)
    x, y = model.x[:8], model.y[:8]
    model.eval()
    with torch.no_grad():
        raw = torch.nn.functional.mse_loss(model(x), y)
        with callback.ema_weights():
            ema = torch.nn.functional.mse_loss(model(x), y)
    metrics = trainer.callback_metrics
    assert metrics["val_loss"] == pytest.approx(raw.item(), rel=1e-5)
    assert metrics["val_loss_ema"] == pytest.approx(ema.item(), rel=1e-5)
    assert abs(raw.item() - ema.item()) > 1e-4  # the two really differ
    with pytest.raises(
        ValueError,
        match=r"`module` must be the module this EMA averages \(the _BothMetrics it was built with\), got another Linear",
    ):
        callback.functional_call(torch.nn.Linear(6, 8), (x,))


def test_load_from_checkpoint_returns_the_ema_and_fit_resumes_from_raw(tmp_path):
    model = TinyModel()
    callback = EMAScalingCallback(momentum=0.9)
    trainer = make_trainer([callback])
    trainer.fit(model)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    loaded = TinyModel.load_from_checkpoint(path)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, callback.ema_state_dict()[name].to(value.dtype)), name
    # the raw weights are in the callback's state, stored once
    raw = torch.load(path, weights_only=False)["callbacks"][callback.state_key]["raw_state_dict"]
    assert torch.equal(raw["net.0.weight"], model.net[0].weight)


def _fit(tmp_path, max_epochs, ckpt_path=None, save=None, **callback_kwargs):
    L.seed_everything(7)
    model = TinyModel(n_samples=24, batch_size=4, optimizer="adam", lr=0.01, scheduler="exponential")
    callbacks = [EMAScalingCallback(momentum=0.8, base_batch_size=2, optimizer_rule="adam", **callback_kwargs)]
    trainer = make_trainer(callbacks, max_epochs=max_epochs, accumulate_grad_batches=2)
    trainer.fit(model, ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    return model, callbacks[0]


@pytest.mark.parametrize(
    "options",
    [
        {"update_every": 1},
        {"update_every": 4},
        # the peers' options: a delayed start, their warm-up and floor, a debiased EMA, switch EMA
        {"update_every": 4, "start_after_samples": 20, "warmup": "inverse-power", "warmup_power": 0.75,
         "min_momentum": 0.3},
        {"debias": True, "switch_every_samples": 20, "switch_momentum": 0.25},
        {"warmup": "ratio", "start_after_samples": 4, "debias": True, "update_every": 3},
    ],
)  # fmt: skip
def test_resume_is_bit_identical(tmp_path, options):
    full_model, full = _fit(tmp_path, 4, **options)
    path = tmp_path / "half.ckpt"
    _fit(tmp_path, 2, save=path, **options)
    resumed_model, resumed = _fit(tmp_path, 4, ckpt_path=path, **options)
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    for name, value in full.ema_state_dict().items():
        assert torch.equal(value, resumed.ema_state_dict()[name]), name
    assert (resumed.samples_seen, resumed.optimizer_steps) == (full.samples_seen, full.optimizer_steps) == (96, 12)


def test_resume_with_a_different_batch_size_keeps_the_horizon_in_samples(tmp_path):
    model = TinyModel(batch_size=4)
    first = EMAScalingCallback(momentum=0.9)  # base resolved to 4 from the first step
    trainer = make_trainer([first])
    trainer.fit(model)
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    bigger = TinyModel(batch_size=16)
    second = EMAScalingCallback(momentum=0.9)
    make_trainer([second], max_epochs=2).fit(bigger, ckpt_path=path)
    assert second.resolved_base_batch_size == 4
    assert second.kappa == 4.0 and second.ema_momentum == pytest.approx(0.9**4)
    assert second.samples_seen == 64


def test_checkpoint_without_state_warns(tmp_path):
    model = TinyModel()
    trainer = make_trainer([])
    trainer.fit(model)
    path = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(path)
    with pytest.warns(UserWarning, match=r"The checkpoint has no EMAScalingCallback\{'name': 'ema'\} state"):
        make_trainer([EMAScalingCallback(momentum=0.9)], max_epochs=2).fit(TinyModel(), ckpt_path=path)


def test_bf16_model_keeps_an_fp32_ema_that_moves():
    L.seed_everything(0)
    model = TinyModel()
    callback = EMAScalingCallback(momentum=0.9999, base_batch_size=4)
    recorder = StepRecorder()
    initial = _initial(model)
    make_trainer([callback, recorder], precision="bf16-true").fit(model)
    ema = callback.ema_state_dict()
    assert model.net[0].weight.dtype == torch.bfloat16
    assert ema["net.0.weight"].dtype == torch.float32
    initial = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in initial.items()}
    expected = reference_ema(initial, recorder, 0.9999, 4)
    _assert_ema_matches(callback, expected, atol=1e-6)
    moved = (ema["net.0.weight"] - initial["net.0.weight"].float()).abs().max()
    assert moved > 0  # a bf16 EMA would round every one of these updates away
    assert (ema["net.0.weight"].bfloat16() == initial["net.0.weight"]).float().mean() > 0.5


class _StepSpy(L.Callback):
    """Registers an optimizer pre-hook after the EMA callback's: it sees what the step really uses."""

    def __init__(self):
        self.seen = []

    def on_fit_start(self, trainer, pl_module):
        def record(optimizer, args, kwargs):
            group = optimizer.param_groups[0]
            self.seen.append((group["lr"], group.get("betas"), group.get("eps")))

        trainer.optimizers[0].register_step_pre_hook(record)


class _SchedModel(TinyModel):
    def configure_optimizers(self):
        cls = torch.optim.SGD if self.hparams.optimizer == "sgd" else torch.optim.Adam
        kwargs = {"momentum": 0.9} if cls is torch.optim.SGD else {"betas": (0.9, 0.99)}
        optimizer = cls(self.parameters(), lr=self.hparams.lr, **kwargs)
        schedulers = {
            "step": lambda: torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5),
            "exponential": lambda: torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9),
            "lambda": lambda: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step)),
            "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.hparams.lr, total_steps=50),
        }
        self.scheduler = schedulers[self.hparams.scheduler]()
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler, "interval": "step"}}


class _LrTrace(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        group = trainer.optimizers[0].param_groups[0]
        self.lrs.append((group["lr"], group.get("betas"), group.get("momentum")))


@pytest.mark.parametrize("scheduler", ["step", "exponential", "lambda", "onecycle"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_schedulers_keep_their_values_while_the_step_sees_scaled_ones(scheduler, optimizer):
    def run(callbacks):
        L.seed_everything(0)
        model = _SchedModel(optimizer=optimizer, scheduler=scheduler, lr=0.05)
        trace, spy = _LrTrace(), _StepSpy()
        make_trainer([*callbacks, trace, spy], accumulate_grad_batches=2).fit(model)
        return trace, spy

    plain, plain_steps = run([])
    rule = "sgd" if optimizer == "sgd" else "adam"
    scaled, scaled_steps = run([EMAScalingCallback(momentum=0.9, base_batch_size=4, optimizer_rule=rule)])
    kappa = 2.0
    # Outside the step, the scheduler's values are untouched by the callback: nothing compounds or leaks.
    assert [lr for lr, _, _ in scaled.lrs] == [lr for lr, _, _ in plain.lrs]
    assert [b for _, b, _ in scaled.lrs] == [b for _, b, _ in plain.lrs]
    assert [m for _, _, m in scaled.lrs] == [m for _, _, m in plain.lrs]
    # Inside the step, the optimizer rule applies to the scheduler's current values.
    assert len(scaled_steps.seen) == len(plain_steps.seen) == 4
    for (lr, betas, eps), (plain_lr, plain_betas, plain_eps) in zip(scaled_steps.seen, plain_steps.seen):
        if optimizer == "sgd":
            assert lr == pytest.approx(kappa * plain_lr)
        else:
            assert lr == pytest.approx(math.sqrt(kappa) * plain_lr)
            assert betas == pytest.approx(tuple(1 - kappa * (1 - b) for b in plain_betas))
            assert eps == pytest.approx(plain_eps / math.sqrt(kappa))


def test_adam_rule_error_at_step_keeps_state(tmp_path):
    model = TinyModel(batch_size=16, optimizer="adam", lr=0.01)
    callback = EMAScalingCallback(momentum=0.9, base_batch_size=1, optimizer_rule="adam")  # kappa 16 >= 1/(1-0.9)
    trainer = make_trainer([callback])
    with pytest.raises(ValueError, match=r"`betas\[0\]` = 0.9 .* at kappa = 16"):
        trainer.fit(model)
    group = trainer.optimizers[0].param_groups[0]
    assert group["lr"] == 0.01 and group["betas"] == (0.9, 0.999)  # nothing half-scaled is left behind


def test_optimizer_exception_restores_hyperparameters():
    class Boom(TinyModel):
        def training_step(self, batch, batch_idx):
            if self.trainer.global_step == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    model = Boom()
    trainer = make_trainer([EMAScalingCallback(momentum=0.9, base_batch_size=1, optimizer_rule="sgd")])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model)  # the closure raises inside optimizer.step(), after the pre-hook scaled the LR
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.1


def test_rule_that_does_not_fit_the_optimizer_fails_at_fit_start():
    model = TinyModel(optimizer="adam")
    with pytest.raises(ValueError, match=r"`optimizer_rule`=SGDScalingRule\(\) does not fit optimizer 0 \(Adam\)"):
        make_trainer([EMAScalingCallback(optimizer_rule="sgd")]).fit(model)


def test_several_instances_coexist(tmp_path):
    model = TinyModel()
    fast = EMAScalingCallback(momentum=0.5, name="fast", evaluate_with_ema=False)
    slow = EMAScalingCallback(momentum=0.99, name="slow")
    trainer = make_trainer([fast, slow])
    trainer.fit(model)
    assert fast.state_key != slow.state_key
    assert {"fast/kappa", "slow/kappa", "fast/momentum", "slow/momentum"} <= set(trainer.callback_metrics)
    a, b = fast.ema_state_dict()["net.0.weight"], slow.ema_state_dict()["net.0.weight"]
    assert not torch.equal(a, b)
    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(path)
    states = torch.load(path, weights_only=False)["callbacks"]
    assert fast.state_key in states and slow.state_key in states


def test_update_every_uses_the_accumulated_momentum():
    L.seed_everything(0)
    model = TinyModel(n_samples=32, batch_size=4)
    initial = _initial(model)
    callback = EMAScalingCallback(momentum=0.9, base_batch_size=2, update_every=3)
    recorder = StepRecorder()
    make_trainer([callback, recorder]).fit(model)
    ema = {k: v.double() for k, v in initial.items()}
    decay = 1.0
    for step, (weights, batch) in enumerate(zip(recorder.weights, recorder.batch_sizes), start=1):
        decay *= 0.9 ** (batch / 2)
        if step % 3 == 0:
            ema = {
                k: decay * ema[k] + (1 - decay) * v.double() if v.is_floating_point() else v.double()
                for k, v in weights.items()
            }
            decay = 1.0
    assert callback.scaled_ema.state_dict()["pending_decay"] == pytest.approx(
        0.9**4
    )  # steps 7 and 8 wait for the next window
    _assert_ema_matches(callback, ema)


@pytest.mark.parametrize("batch_size", [2, 8])
def test_warmup_is_counted_in_base_batch_steps(batch_size):
    class Trace(L.Callback):
        def __init__(self, ema):
            self.ema, self.points = ema, []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.points.append((self.ema.samples_seen, self.ema.ema_momentum))

    model = TinyModel(n_samples=32, batch_size=batch_size)
    callback = EMAScalingCallback(momentum=0.999, base_batch_size=2, warmup=True)
    trace = Trace(callback)
    make_trainer([callback, trace]).fit(model)
    kappa = batch_size / 2
    for samples_after, rho_hat in trace.points:
        t = (samples_after - batch_size) / 2  # base-batch steps seen before this step
        assert rho_hat == pytest.approx(min(0.999, (1 + t) / (10 + t)) ** kappa)


def test_logged_metrics_and_progress_bar():
    model = TinyModel()
    callback = EMAScalingCallback(momentum=0.9, base_batch_size=2, optimizer_rule="sgd")
    trainer = make_trainer([callback], enable_progress_bar=True)
    trainer.fit(model)
    metrics = trainer.callback_metrics
    assert metrics["ema/kappa"] == 2.0
    assert metrics["ema/momentum"] == pytest.approx(0.81)
    assert metrics["ema/batch_size"] == 4
    assert metrics["ema/samples_seen"] == 32
    assert metrics["ema/lr-SGD"] == pytest.approx(0.2)  # the effective (scaled) LR
    # rho-hat = 0.81 at batch 4 is rho = 0.9 at batch 2: a half-life of 2 ln(1/2) / ln(0.9) = 13.2 samples
    assert metrics["ema/half_life"] == pytest.approx(2 * math.log(0.5) / math.log(0.9))
    # the progress bar shows what stays readable when rho-hat rounds to 1.000: kappa and the half-life
    assert set(trainer.progress_bar_metrics) == {"ema/kappa", "ema/half_life"}
    assert (callback.global_batch_size, callback.ema_updates, callback.momentum_attributes) == (4, 8, None)


class _ManualModel(TinyModel):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


def test_manual_optimization():
    model = _ManualModel()
    callback = EMAScalingCallback(momentum=0.9, base_batch_size=2, optimizer_rule="sgd")
    make_trainer([callback]).fit(model)
    assert callback.optimizer_steps == 8 and callback.kappa == 2.0
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"momentum": 1.0}, r"`momentum` must be in \[0, 1\), got 1.0"),
        ({"momentum": -0.5}, r"`momentum` must be in \[0, 1\), got -0.5"),
        ({"base_batch_size": 0}, r"`base_batch_size` must be a positive integer or None, got 0"),
        ({"base_batch_size": 2.5}, r"`base_batch_size` must be a positive integer or None, got 2.5"),
        ({"update_every": 0}, r"`update_every` must be a positive integer, got 0"),
        ({"optimizer_rule": "lamb"}, r"`optimizer_rule` must be one of \['adam', 'none', 'sgd'\].*got 'lamb'"),
        ({"ema_precision": "fp16"}, r"`ema_precision` must be one of \['fp32', 'model'\], got 'fp16'"),
        ({"name": ""}, r"`name` must be a non-empty string, got ''"),
        ({"warmup": "yes"}, r"`warmup` must be True, False or one of \['ratio', 'inverse-power'\], got 'yes'"),
        ({"evaluate_with_ema": 1}, r"`evaluate_with_ema` must be True or False, got 1"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMAScalingCallback(**kwargs)


def test_setup_errors():
    a, b = EMAScalingCallback(), EMAScalingCallback()
    with pytest.raises(RuntimeError, match=r"The `callback.state_key` must be unique"):  # Lightning's own check
        make_trainer([a, b])
    a, b = EMAScalingCallback(name="a"), EMAScalingCallback(name="b")
    with pytest.raises(
        ValueError, match=r"Only one EMAScalingCallback may set `evaluate_with_ema=True`, got \['a', 'b'\]"
    ):
        make_trainer([a, b]).fit(TinyModel())
    fake = SimpleNamespace(strategy=FSDPStrategy(use_orig_params=False), callbacks=[a])
    with pytest.raises(
        RuntimeError,
        match=r"supports single-device, DDP, ModelParallelStrategy .* got FSDPStrategy with use_orig_params=False\.",
    ):
        a.setup(fake, TinyModel(), "fit")


def test_public_methods_before_fit_explain_themselves():
    with pytest.raises(RuntimeError, match=r"The EMA does not exist yet: it is created when `trainer.fit` starts"):
        EMAScalingCallback().ema_state_dict()


def test_load_state_dict_rejects_unknown_format():
    with pytest.raises(ValueError, match=r"state has format 99; this version of lightning-emascale reads format 1"):
        EMAScalingCallback().load_state_dict({"format": 99})


def test_short_dataloader_passed_to_fit():
    data = DataLoader(TensorDataset(torch.randn(10, 6), torch.randn(10, 1)), batch_size=4)
    callback = EMAScalingCallback(momentum=0.9, base_batch_size=4)
    make_trainer([callback]).fit(TinyModel(), train_dataloaders=data)
    assert callback.kappa == 0.5 and callback.samples_seen == 10


def test_two_callbacks_with_rules_fail_at_fit_start():
    first = EMAScalingCallback(momentum=0.9, name="a", optimizer_rule="sgd", evaluate_with_ema=False)
    second = EMAScalingCallback(momentum=0.99, name="b", optimizer_rule="sgd")
    with pytest.raises(ValueError, match=r"already scaled by the rule of .*: two rules would compound"):
        make_trainer([first, second]).fit(TinyModel())


def test_a_distributed_checkpoint_restored_before_the_ema_is_built_is_refused():
    from lightning.pytorch.trainer.states import TrainerFn

    callback = EMAScalingCallback()
    fitting = SimpleNamespace(
        state=SimpleNamespace(fn=TrainerFn.FITTING), ckpt_path=None, strategy=SimpleNamespace(model=None)
    )
    clock = {"format": 1, "base_batch_size": 4, "samples_seen": 8, "optimizer_steps": 2, "ema_updates": 2}
    state = {**clock, "pending_decay": 1.0, "sharded_ema_in_state_dict": "_emascale.ema.", "model_holds_ema": True}
    with pytest.raises(
        RuntimeError,
        match=r"the strategy restored it before this callback built its EMA: resume it under ModelParallelStrategy",
    ):
        callback.on_load_checkpoint(fitting, TinyModel(), {"callbacks": {callback.state_key: state}})
    # evaluating from it (validate(ckpt_path=...)) needs no EMA of this run: the module holds the checkpoint's EMA
    validating = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.VALIDATING))
    callback.on_load_checkpoint(validating, TinyModel(), {"callbacks": {callback.state_key: dict(state)}})
    assert callback._module_loaded_from_ema


def test_the_progress_bar_and_the_logs_show_what_the_docstring_says():
    callback = EMAScalingCallback(momentum=0.99, update_every=4)
    trainer = make_trainer([callback])
    trainer.fit(TinyModel())  # 8 steps of 4 samples: two updates
    bar = {key for key in trainer.progress_bar_metrics if key.startswith("ema/")}
    assert bar == {"ema/kappa", "ema/half_life"}
    assert "``<name>/kappa`` and ``/half_life`` in the progress bar" in " ".join(EMAScalingCallback.__doc__.split())
    logged = trainer.logged_metrics
    assert float(logged["ema/momentum"]) == pytest.approx(0.99)  # per step
    assert float(logged["ema/momentum_per_update"]) == pytest.approx(0.99**4)  # what each update applied
    assert callback.momentum_per_update == pytest.approx(0.99**4)
