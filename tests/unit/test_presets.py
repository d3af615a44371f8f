"""Presets against the tools they reproduce: the same model, data and steps at the base batch (κ = 1) give the
same EMA to 1e-6 — timm and ema-pytorch run here; diffusers and composer are not installed (diffusers pulls in the
Hugging Face stack, composer a trainer of its own), so their documented formulas are written out below as the
reference. At κ = 2 and 4 the same preset keeps the tool's horizon in samples, where the tool's own (in steps)
grows κ times. Lightning's ``EMAWeightAveraging`` and lightly are in ``tests/lightning/test_presets_in_the_trainer.py``."""

from __future__ import annotations

import pytest
import torch

from lightning_emascale import EMAScalingCallback, ScaledEMA, half_life_from_momentum
from lightning_emascale.presets import LightlyCosine, preset_options, tool_arguments

BATCH, STEPS = 8, 60
#: The largest difference seen per preset (filled by the tests, printed when the module's tests end: `-s`).
LARGEST: dict[str, float] = {}


@pytest.fixture(autouse=True, scope="module")
def report_the_largest_differences():
    yield
    for name, gap in sorted(LARGEST.items()):
        print(f"\npreset {name}: largest |ours - theirs| = {gap:.3g}")


def new_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    )


def batches(kappa: int = 1, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * BATCH, 6, generator=generator, dtype=dtype)
    y = torch.randn(STEPS * BATCH, 3, generator=generator, dtype=dtype)
    size = BATCH * kappa
    for start in range(0, len(x) - size + 1, size):
        yield x[start : start + size], y[start : start + size]


def train(model, ema, peer_update, kappa: int = 1):
    dtype = next(model.parameters()).dtype
    """SGD on the data, the EMA's optimizer attached; yields the steps taken after each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05 * kappa, momentum=0.9)
    if ema is not None:
        ema.attach(optimizer)
    for step, (x, y) in enumerate(batches(kappa, dtype), start=1):
        torch.nn.functional.mse_loss(model(x), y).backward()
        if ema is not None:
            ema.count_samples(len(x))
        optimizer.step()
        optimizer.zero_grad()
        yield step


def float_gap(ours: dict, theirs: dict, names) -> float:
    """The largest difference, relative where a value exceeds 1 in size (float32 rounding scales with it)."""
    return max(
        ((ours[name].float() - theirs[name].float()).abs() / theirs[name].float().abs().clamp(min=1.0)).max().item()
        for name in names
    )


def run_against(tool: str, make_peer, peer_update, peer_tensors, **arguments) -> float:
    """Our preset of ``tool`` and the peer side by side; the largest gap over every step and tensor compared."""
    model = new_model()
    peer = make_peer(model)
    ema = ScaledEMA.from_preset(tool, model, base_batch_size=BATCH, **arguments)
    gap = 0.0
    for step in train(model, ema, peer_update):
        peer_update(peer, model, step)
        theirs = peer_tensors(peer)
        gap = max(gap, float_gap(ema.ema_state_dict(), theirs, theirs))
    LARGEST[f"{tool} {arguments}"] = gap
    return gap


# ------------------------------------------------------------------------------------------------- timm
timm = pytest.importorskip("timm.utils.model_ema")


def timm_peer(**kwargs):
    return lambda model: timm.ModelEmaV3(model, **kwargs)


def timm_update(peer, model, step):
    peer.update(model, step=step)  # timm's train.py: after the optimizer step, with the steps taken


def timm_tensors(peer):
    return {name: value for name, value in peer.module.state_dict().items() if value.is_floating_point()}


@pytest.mark.parametrize(
    "arguments",
    [
        {"decay": 0.99},
        {"decay": 0.95, "update_after_step": 7},
        {"decay": 0.999, "use_warmup": True},
        {"decay": 0.99, "use_warmup": True, "warmup_gamma": 2.0, "warmup_power": 0.75, "min_decay": 0.5},
        {"decay": 0.99, "use_warmup": True, "update_after_step": 5},
    ],
)
def test_timm_preset_equals_model_ema_v3(arguments):
    gap = run_against("timm", timm_peer(**arguments), timm_update, timm_tensors, **arguments)
    assert gap < 1e-6


# ------------------------------------------------------------------------------------------ ema-pytorch
ema_pytorch = pytest.importorskip("ema_pytorch")


def ema_pytorch_peer(**kwargs):
    return lambda model: ema_pytorch.EMA(model, include_online_model=False, **kwargs)


def ema_pytorch_update(peer, model, step):
    peer.update()


def ema_pytorch_tensors(peer):
    return {name: value for name, value in peer.ema_model.state_dict().items() if value.is_floating_point()}


@pytest.mark.parametrize(
    "arguments",
    [
        {"beta": 0.99, "update_every": 1, "update_after_step": 0},
        {"beta": 0.999, "update_every": 1, "update_after_step": 10, "power": 0.75, "inv_gamma": 2.0},
        {"beta": 0.99, "update_every": 1, "update_after_step": 3, "min_value": 0.4},
        {"beta": 0.99, "update_every": 1, "update_after_step": 2, "update_model_with_ema_every": 9},
        {"beta": 0.99, "update_every": 1, "update_after_step": 2, "update_model_with_ema_every": 7,
         "update_model_with_ema_beta": 0.3},
    ],
)  # fmt: skip
def test_ema_pytorch_preset_equals_its_ema(arguments):
    model = new_model()
    if "update_model_with_ema_every" in arguments:  # switch EMA writes the model: compare the models too
        peer_model = new_model()
        peer = ema_pytorch.EMA(peer_model, include_online_model=False, **arguments)
        ema = ScaledEMA.from_preset("ema_pytorch", model, base_batch_size=BATCH, **arguments)
        peer_steps = train(peer_model, None, None)
        gap = 0.0
        for _ in zip(train(model, ema, None), peer_steps):
            peer.update()
            gap = max(gap, float_gap(ema.ema_state_dict(), ema_pytorch_tensors(peer), ema_pytorch_tensors(peer)))
            gap = max(gap, float_gap(model.state_dict(), peer_model.state_dict(), ema_pytorch_tensors(peer)))
        LARGEST[f"ema_pytorch {arguments}"] = gap
        assert ema.options.switch_every_samples == arguments["update_model_with_ema_every"] * BATCH
    else:
        gap = run_against(
            "ema_pytorch", ema_pytorch_peer(**arguments), ema_pytorch_update, ema_pytorch_tensors, **arguments
        )
    assert gap < 1e-6


def lag_on_a_line(step_ema, steps: int) -> dict[int, float]:
    """Weights on a line (θ_k = k: one parameter, gradient -1, SGD at lr 1): the EMA's lag behind them, in steps,
    after every 500 steps. ``step_ema(model, optimizer)`` builds the EMA and returns what to call after each step
    and how to read the EMA's value."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    model = torch.nn.ParameterList([parameter])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    after_step, value = step_ema(model, optimizer)
    lags = {}
    for step in range(1, steps + 1):
        (-parameter.sum()).backward()
        after_step()
        if step % 500 == 0:
            lags[step] = step - value()
    return lags


def test_ema_pytorch_defaults_update_every_ten_steps_keep_its_horizon_not_its_phase():
    """ema-pytorch's defaults (β = 0.9999 once every 10 steps, its warm-up always on, 100 steps copied): here an
    update every 10 steps applies the product of ten per-step momenta, whose warm-up is ema-pytorch's per update
    turned per step (γ / 10^(1/p)). On weights moving at a constant speed the lag differs by less than one update
    window all along the warm-up (ema-pytorch updates at steps 1, 11, 21, ..., here at 10, 20, 30, ...)."""
    arguments = {"beta": 0.9999}
    options = preset_options("ema_pytorch", base_batch_size=BATCH, **arguments)
    assert options["update_every"] == 10 and options["momentum"] == pytest.approx(0.9999**0.1, rel=1e-15)

    def theirs(model, optimizer):
        peer = ema_pytorch.EMA(model, include_online_model=False, **arguments)

        def after_step():
            optimizer.step()
            optimizer.zero_grad()
            peer.update()

        return after_step, lambda: peer.ema_model[0].item()

    def ours(model, optimizer):
        ema = ScaledEMA.from_preset("ema_pytorch", model, optimizer, base_batch_size=BATCH, **arguments)

        def after_step():
            ema.count_samples(BATCH)
            optimizer.step()
            optimizer.zero_grad()

        return after_step, lambda: ema.ema_state_dict()["0"].item()

    mine, peer = lag_on_a_line(ours, 3000), lag_on_a_line(theirs, 3000)
    for step in mine:
        assert abs(mine[step] - peer[step]) < 10, (step, mine[step], peer[step])
    assert peer[3000] > 1000  # a long lag: the warm-up matters here (γ·10^(1/p) instead gave 10, not 1000)
    LARGEST["ema_pytorch defaults, lag in steps on a line (update_every=10)"] = max(
        abs(mine[step] - peer[step]) for step in mine
    )


# ------------------------------------------------------------------------------------ diffusers (formula)
class DiffusersEMAModel:
    """diffusers' ``EMAModel`` as documented (training_utils.py): ``step()`` counts the optimization step first,
    ``get_decay`` is 0 until ``update_after_step`` + 1, then ``1 - (1 + t/inv_gamma)^-power`` with
    ``use_ema_warmup`` or ``(1 + t)/(10 + t)`` without, capped by ``decay`` and floored by ``min_decay``; the
    parameters only move by ``s -= (1 - decay)(s - p)``."""

    def __init__(self, parameters, decay=0.9999, min_decay=0.0, update_after_step=0, use_ema_warmup=False,
                 inv_gamma=1.0, power=2 / 3):  # fmt: skip
        self.shadow = [p.detach().clone() for p in parameters]
        self.decay, self.min_decay, self.update_after_step = decay, min_decay, update_after_step
        self.use_ema_warmup, self.inv_gamma, self.power = use_ema_warmup, inv_gamma, power
        self.optimization_step = 0

    def get_decay(self, optimization_step):
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_ema_warmup:
            value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            value = (1 + step) / (10 + step)
        return max(min(value, self.decay), self.min_decay)

    @torch.no_grad()
    def step(self, parameters):
        self.optimization_step += 1
        one_minus_decay = 1 - self.get_decay(self.optimization_step)
        for shadow, parameter in zip(self.shadow, parameters):
            shadow.sub_(one_minus_decay * (shadow - parameter))


@pytest.mark.parametrize(
    "arguments",
    [
        {"decay": 0.999},
        {"decay": 0.99, "use_ema_warmup": True, "power": 0.75},
        {"decay": 0.99, "use_ema_warmup": True, "update_after_step": 4, "min_decay": 0.3, "inv_gamma": 3.0},
        {"decay": 0.95, "update_after_step": 6, "min_decay": 0.5},
    ],
)
def test_diffusers_preset_equals_its_documented_formula(arguments):
    def make(model):
        return DiffusersEMAModel(model.parameters(), **arguments)

    def update(peer, model, step):
        peer.step(model.parameters())

    def tensors(peer):
        return dict(zip([n for n, _ in new_model().named_parameters()], peer.shadow))

    assert run_against("diffusers", make, update, tensors, **arguments) < 1e-6


# ------------------------------------------------------------------------------------- composer (formula)
class ComposerEMA:
    """composer's ``EMA`` algorithm as documented (run in float64 below: in float32 its ``ema * s + (1 - s) *
    model`` rounds three times per update where a lerp rounds once, 1.3e-6 apart after 60 updates at a half-life of
    40 batches, the same for both ways of writing the half-life): ``smoothing = 2^(-update_interval/half_life)``; the EMA begins
    once ``ema_start`` of training is done (a copy of the model, then updated at the same batch end), and
    ``compute_ema`` moves the parameters and buffers by ``ema = ema * s + (1 - s) * model``."""

    def __init__(self, half_life_batches: float, start_batches: int):
        self.smoothing = 2 ** (-1 / half_life_batches)
        self.start = start_batches
        self.ema = None

    @torch.no_grad()
    def batch_end(self, model, batches_done):
        """At Event.BATCH_END, after composer's timestamp counted the batch: it starts at the first batch whose
        count reaches the start (``ema_start <= timestamp``)."""
        if self.ema is None and batches_done >= self.start:
            self.ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.ema is not None:
            for name, value in model.state_dict().items():
                if value.is_floating_point():
                    self.ema[name].copy_(self.ema[name] * self.smoothing + (1.0 - self.smoothing) * value)


@pytest.mark.parametrize("half_life, ema_start", [("20ba", "0.0dur"), ("10ba", "6ba"), (f"{40 * BATCH}sam", "24sam")])
def test_composer_preset_equals_its_documented_formula(half_life, ema_start):
    length = float(half_life[:-2]) if half_life.endswith("ba") else float(half_life[:-3]) / BATCH
    start = (
        0
        if ema_start.endswith("dur")
        else int(ema_start[:-2])
        if ema_start.endswith("ba")
        else int(ema_start[:-3]) // BATCH
    )
    peer = ComposerEMA(length, start)
    model = new_model().double()  # float64: composer's three roundings per update against one lerp
    ema = ScaledEMA.from_preset("composer", model, base_batch_size=BATCH, half_life=half_life, ema_start=ema_start)
    gap = 0.0
    for step in train(model, ema, None):
        peer.batch_end(model, step)
        if peer.ema is not None:
            names = [k for k, v in peer.ema.items() if v.is_floating_point()]
            gap = max(gap, float_gap(ema.ema_state_dict(), peer.ema, names))
    LARGEST[f"composer half_life={half_life} ema_start={ema_start}"] = gap
    assert peer.ema is not None and gap < 1e-6


# --------------------------------------------------------------------------------- κ = 2, 4: the horizon
def steps_at(tool: str, arguments: dict, factor: int) -> dict[int, tuple[float, float]]:
    """(ρ̂, half-life in samples) of every step of a run at ``factor`` × the base batch, by the samples seen before
    the step (SGD with the rule: LR × κ)."""
    rows = {}
    model = new_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ema = ScaledEMA.from_preset(tool, model, optimizer, base_batch_size=BATCH, optimizer_rule="sgd", **arguments)
    for x, y in batches(factor):
        torch.nn.functional.mse_loss(model(x), y).backward()
        ema.count_samples(len(x))
        samples_before = ema.samples_seen
        optimizer.step()
        optimizer.zero_grad()
        assert ema.kappa == factor
        rows[samples_before] = (ema.ema_momentum, ema.half_life)
    return rows


@pytest.mark.parametrize(
    "tool, arguments",
    [
        ("timm", {"decay": 0.9, "update_after_step": 4}),
        ("timm", {"decay": 0.99, "use_warmup": True, "update_after_step": 4}),
        ("diffusers", {"decay": 0.99, "update_after_step": 4}),
        ("ema_pytorch", {"beta": 0.99, "update_every": 1, "update_after_step": 4}),
        ("lightning", {"decay": 0.95, "update_starting_at_step": 4}),
        ("composer", {"half_life": "20ba", "ema_start": "4ba"}),
    ],
)
@pytest.mark.parametrize("kappa", [2, 4])
def test_at_kappa_2_and_4_the_preset_keeps_the_tools_horizon_in_samples(tool, arguments, kappa):
    """The copy phase ends at the same sample count as at κ = 1, the warm-up reads the samples seen (ρ̂ is the
    κ = 1 run's momentum at the same sample count, to the power κ), so a constant momentum has the κ = 1 half-life
    in samples. The tool itself, stepping at κB, counts steps: its half-life in samples grows κ times."""
    base, scaled = steps_at(tool, arguments, 1), steps_at(tool, arguments, kappa)
    start = preset_options(tool, base_batch_size=BATCH, **arguments)["start_after_samples"]
    assert start == (3 if tool == "composer" else 4) * BATCH  # composer's batch 4 copies: its count is 4 then
    for samples, (momentum, half_life) in scaled.items():
        assert (momentum == 0.0) == (samples <= start)
        assert momentum == pytest.approx(base[samples][0] ** kappa, rel=1e-12, abs=1e-300)
        if samples > start:
            assert half_life == pytest.approx(base[samples][1], rel=1e-9)  # in samples: the κ = 1 run's
    if tool == "timm" and "use_warmup" not in arguments:  # a constant momentum after the start
        peer = timm.ModelEmaV3(torch.nn.Linear(1, 1), **arguments)
        ours = scaled[max(scaled)][1]
        assert ours == pytest.approx(base[max(scaled)][1], rel=1e-12)
        theirs = half_life_from_momentum(peer.get_decay(100), BATCH * kappa)  # its decay per step, at κB samples
        assert theirs == pytest.approx(kappa * ours, rel=1e-12)


# ----------------------------------------------------------------------------------- the presets' checks
@pytest.mark.parametrize(
    "tool, arguments, error, match",
    [
        ("keras", {}, ValueError, r"`tool` must be one of \['composer', 'diffusers', 'ema_pytorch', 'lightly', 'lightning', 'timm'\], got 'keras'"),
        ("timm", {"decay": 0.99, "beta": 0.9}, ValueError, r"The 'timm' preset takes timm's arguments \[.*\], got \['beta'\]"),
        ("timm", {"decay": 1.5}, ValueError, r"`decay` must be in \[0, 1\), got 1.5"),
        ("timm", {"min_decay": 0.5}, ValueError, r"`min_decay`=0.5 has no effect in timm without its warm-up: drop it"),
        ("timm", {"exclude_buffers": True}, ValueError, r"`exclude_buffers=True` keeps the buffers out of the average: here list them in `exclude=\[...\]`"),
        ("timm", {"update_after_step": -1}, ValueError, r"`update_after_step` must be an integer >= 0, got -1"),
        ("ema_pytorch", {"update_model_with_ema_beta": 0.5}, ValueError, r"`update_model_with_ema_beta`=0.5 has no effect without `update_model_with_ema_every`"),
        ("ema_pytorch", {"update_every": 0}, ValueError, r"`update_every` must be a positive integer, got 0"),
        ("lightning", {"use_buffers": False}, ValueError, r"`use_buffers=False` keeps the buffers out of the average"),
        ("lightly", {"start_value": 0.99}, ValueError, r"The 'lightly' preset's cosine schedule needs `max_steps` \(lightly's total steps\) or `total_samples`"),
        ("composer", {"half_life": None}, ValueError, r"Give one of `half_life` and `smoothing` \(composer's EMA takes exactly one\)"),
        ("composer", {"half_life": "2ep"}, ValueError, r"`half_life` must be a composer time string in \['ba', 'sam'\] \(e.g. '1000ba'\), got '2ep'; epochs are not supported"),
        ("composer", {"ema_start": "0.5dur"}, ValueError, r"`ema_start`='0.5dur' is a fraction of the run: give `total_samples`"),
        ("composer", {"update_interval": "2sam"}, ValueError, r"`update_interval` must be a composer time string in \['ba'\]"),
    ],
)  # fmt: skip
def test_preset_errors_name_the_argument(tool, arguments, error, match):
    with pytest.raises(error, match=match):
        preset_options(tool, base_batch_size=BATCH, **arguments)


def test_from_preset_refuses_an_option_the_preset_sets_and_passes_ours_through():
    with pytest.raises(ValueError, match=r"\['momentum'\] are set by the 'timm' preset from timm's arguments"):
        EMAScalingCallback.from_preset("timm", base_batch_size=BATCH, decay=0.99, momentum=0.9)
    with pytest.raises(
        ValueError,
        match=r"`base_batch_size` must be a positive integer \(the global batch the tool was tuned at\), got None",
    ):
        ScaledEMA.from_preset("timm", new_model(), base_batch_size=None)
    callback = EMAScalingCallback.from_preset("timm", base_batch_size=BATCH, decay=0.99, optimizer_rule="sgd", name="t")
    assert callback.momentum == 0.99 and callback.optimizer_rule.__class__.__name__ == "SGDScalingRule"
    assert callback.name == "t" and callback.start_after_samples == 0 and callback.base_batch_size == BATCH


def test_every_preset_takes_the_tools_own_names_and_defaults():
    assert tool_arguments("timm") == (
        "decay", "min_decay", "update_after_step", "use_warmup", "warmup_gamma", "warmup_power", "exclude_buffers"
    )  # fmt: skip
    assert preset_options("ema_pytorch", base_batch_size=4)["start_after_samples"] == 400  # its default: 100 steps
    assert preset_options("diffusers", base_batch_size=4)["warmup"] == "ratio"  # its default warm-up
    lightly = preset_options("lightly", base_batch_size=4, start_value=0.996, end_value=1.0, max_steps=50)
    assert lightly["momentum_schedule"] == LightlyCosine(0.996, 1.0, 50)
    assert preset_options("composer", base_batch_size=4)["momentum"] == pytest.approx(0.5 ** (1 / 1000), rel=1e-15)
