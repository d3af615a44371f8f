"""The noisy parabola (the paper's Section 3.1): does rho^kappa keep an EMA's trajectory when the batch grows?

    python examples/studies/noisy_parabola.py [--kappas 1,2,4,...,1024] [--lr 0.001] [--momentum 0.999]
        [--samples 16384] [--chains 2048] [--lightning-kappas 8,128] [--sweep-lrs 0.0005,0.004]
        [--sweep-momenta 0.99,0.9999] [--out-dir parabola]

SGD on L(theta) = a/2 theta^2 with gradient noise of variance sigma^2/B, and an EMA
zeta <- rho zeta + (1 - rho) theta after each step. A run at kappa times the base batch uses kappa*lr (SGD's
linear rule) and either rho^kappa (the EMA Scaling Rule) or rho unchanged (no rule). The script

(a) simulates many independent chains per kappa with the library's own math (``scale_ema_momentum`` and
    ``SGDScalingRule``) and plots the EMA's mean and variance against samples seen, next to their exact values
    (the moment recursion of this linear-Gaussian system; its stationary variance is in docs/results.md);
(b) finds, for each kappa, the momentum rho*(kappa) whose EMA trajectory is closest to the base run's (a 1-D
    search on the exact moments; distance: 2-Wasserstein between the EMA's Gaussian marginals, averaged over
    the samples both runs visit) and compares it with rho^kappa; repeats the search at other learning rates
    and momenta to show which number decides where the rule departs: kappa x (1 - rho), the EMA's decay per
    scaled step (one update at rho^kappa puts on the newest iterate the weight that kappa updates spread over
    the kappa iterates of the step), while kappa x lr x a matters once SGD nears its stability limit of 2;
(c) runs ``EMAScalingCallback`` in a real Lightning fit for ``--lightning-kappas`` on the same per-sample noise
    as the simulation and reports how far its EMA is from the simulated one.

It prints the tables and writes ``parabola_moments.png``, ``parabola_best_momentum.png`` and ``results.json``
to ``--out-dir``. About 3 minutes on a 2-core CPU with the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lightning_emascale import SGDScalingRule, scale_ema_momentum


@dataclass(frozen=True)
class Parabola:
    """The base-batch problem: curvature ``a``, per-sample noise ``sigma2``, ``batch`` B, SGD ``lr``, EMA ``momentum``."""

    a: float = 1.0
    sigma2: float = 1.0
    batch: int = 1
    lr: float = 0.001
    momentum: float = 0.999
    theta0: float = 1.0
    samples: int = 16384

    def steps(self, kappa: int) -> int:
        if self.samples % (kappa * self.batch):
            raise ValueError(f"`samples`={self.samples} must be a multiple of kappa x batch = {kappa * self.batch}")
        return self.samples // (kappa * self.batch)

    def scaled(self, kappa: int, rule: bool) -> tuple[float, float]:
        """(learning rate, EMA momentum) for a batch of kappa x B: SGD's linear rule, with or without rho^kappa."""
        lr = SGDScalingRule().scale({"lr": self.lr}, kappa)["lr"]
        return lr, scale_ema_momentum(self.momentum, kappa) if rule else self.momentum


def stationary_ema_variance(p: Parabola, kappa: int = 1, rule: bool = True) -> float:
    """Var zeta once the transient is gone (infinite if SGD diverges); phi = 1 - lr a.

    Var theta = lr sigma^2 / (B a (2 - lr a)),  Var zeta = Var theta (1 - rho)/(1 + rho) (1 + rho phi)/(1 - rho phi)
    """
    lr, rho = p.scaled(kappa, rule)
    curvature = lr * p.a
    if not 0 < curvature < 2:
        return math.inf
    phi = 1 - curvature
    var_theta = lr * p.sigma2 / (kappa * p.batch * p.a * (2 - curvature))
    return var_theta * (1 - rho) / (1 + rho) * (1 + rho * phi) / (1 - rho * phi)


def exact_moments(
    p: Parabola, kappa: int, lr: float, momenta: Sequence[float] | torch.Tensor
) -> dict[str, torch.Tensor]:
    """Exact mean and variance of theta and zeta after every step, for each EMA momentum in ``momenta``.

    The state (theta, zeta) is linear in Gaussian noise, so its mean and covariance follow a recursion; each
    momentum is one column (the search evaluates many at once). Rows are steps 0..n (samples 0, kappa*B, ...).
    """
    rho = torch.as_tensor(momenta, dtype=torch.float64).reshape(-1)  # float64: 1 - rho is small
    phi, noise = 1 - lr * p.a, lr * lr * p.sigma2 / (kappa * p.batch)  # Var of the step's noise, lr^2 sigma^2/(kB)
    mean_theta, var_theta = torch.tensor(p.theta0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    mean_ema, cov, var_ema = torch.full_like(rho, p.theta0), torch.zeros_like(rho), torch.zeros_like(rho)
    rows = [(mean_theta.expand_as(rho), var_theta.expand_as(rho), mean_ema, var_ema)]
    for _ in range(p.steps(kappa)):
        # theta' = phi theta - lr xi ;  zeta' = rho zeta + (1 - rho) theta'
        var_ema = rho**2 * var_ema + 2 * rho * (1 - rho) * phi * cov + (1 - rho) ** 2 * (phi**2 * var_theta + noise)
        cov = rho * phi * cov + (1 - rho) * (phi**2 * var_theta + noise)
        var_theta = phi**2 * var_theta + noise
        mean_theta = phi * mean_theta
        mean_ema = rho * mean_ema + (1 - rho) * mean_theta
        rows.append((mean_theta.expand_as(rho), var_theta.expand_as(rho), mean_ema, var_ema))
    names = ("mean_theta", "var_theta", "mean_ema", "var_ema")
    return {name: torch.stack(column) for name, column in zip(names, zip(*rows))}


def sample_noise(p: Parabola, chains: int, seed: int = 0) -> torch.Tensor:
    """Per-sample gradient noise, (samples, chains), variance sigma2: a batch's noise is the mean of its rows."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(p.samples, chains, generator=g) * math.sqrt(p.sigma2)


def simulate(p: Parabola, kappa: int, lr: float, momentum: float, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """Monte-Carlo chains, one per column of ``noise``: the EMA's mean and variance over chains after every step."""
    theta = torch.full((noise.shape[1],), p.theta0)
    ema = theta.clone()
    means, variances = [ema.mean()], [ema.var()]
    for xi in noise.view(p.steps(kappa), kappa * p.batch, -1).mean(1):
        theta.sub_(p.a * theta + xi, alpha=lr)  # what torch.optim.SGD does with this gradient
        ema.lerp_(theta, 1 - momentum)
        means.append(ema.mean())
        variances.append(ema.var())
    return {"mean_ema": torch.stack(means).double(), "var_ema": torch.stack(variances).double()}


def trajectory_distance(base: dict[str, torch.Tensor], run: dict[str, torch.Tensor], kappa: int) -> torch.Tensor:
    """RMS over the shared sample counts of W2(base EMA marginal, run EMA marginal), per column of ``run``.

    Both marginals are Gaussian, so W2^2 = (mean difference)^2 + (std difference)^2. The base run (kappa 1)
    is read every kappa-th step, where both runs have seen the same samples.
    """
    mean_b, std_b = base["mean_ema"][::kappa], base["var_ema"][::kappa].sqrt()
    w2 = (run["mean_ema"] - mean_b) ** 2 + (run["var_ema"].sqrt() - std_b) ** 2
    return w2.mean(0).sqrt()


def best_momentum(p: Parabola, kappa: int, base: dict[str, torch.Tensor], rounds: int = 3) -> tuple[float, float]:
    """rho*(kappa): the momentum minimising ``trajectory_distance`` to the base run; returns (rho*, distance).

    A grid search on log(-log rho), the log of the EMA's decay rate per step, refined around the best point each
    round: the grid first spans decay rates 1/256 to 256 times rho^kappa's.
    """
    lr, _ = p.scaled(kappa, rule=True)
    centre, width = math.log(-math.log(scale_ema_momentum(p.momentum, kappa))), math.log(256.0)
    for _ in range(rounds):
        grid = torch.linspace(centre - width, centre + width, 101, dtype=torch.float64)
        momenta = torch.exp(-torch.exp(grid))
        distance = trajectory_distance(base, exact_moments(p, kappa, lr, momenta), kappa)
        best = int(distance.argmin())
        centre, width = float(grid[best]), 2 * width / 100
    return float(momenta[best]), float(distance[best])


def study(p: Parabola, kappas: list[int]) -> list[dict[str, float]]:
    """One row per kappa: rho^kappa against rho*, and each momentum's distance to the base trajectory."""
    base = exact_moments(p, 1, p.lr, [p.momentum])
    scale = float(((base["mean_ema"] ** 2 + base["var_ema"]).mean()).sqrt())  # W2 from the base run to 0
    rows = []
    for kappa in kappas:
        lr, rule_momentum = p.scaled(kappa, rule=True)
        # Past kappa x lr x a = 2, SGD diverges at kappa x lr: no momentum can follow the base run
        stable = 0 < lr * p.a < 2
        rho_star, best_distance = best_momentum(p, kappa, base) if stable else (math.nan, math.nan)
        both = exact_moments(p, kappa, lr, [rule_momentum, p.momentum])
        rule_distance, plain_distance = trajectory_distance(base, both, kappa).tolist()
        rows.append(
            {
                "kappa": kappa,
                "kappa_lr_a": kappa * p.lr * p.a,
                "rho_rule": rule_momentum,
                "rho_star": rho_star,
                "kappa_star": math.log(rho_star) / math.log(p.momentum),  # rho* = rho^kappa_star
                "distance_rule": rule_distance / scale,
                "distance_star": best_distance / scale,
                "distance_no_rule": plain_distance / scale,
                "var_ema_rule": stationary_ema_variance(p, kappa, rule=True),
                "var_ema_no_rule": stationary_ema_variance(p, kappa, rule=False),
            }
        )
    return rows


def departure(rows: list[dict[str, float]], tolerance: float = 0.05) -> int | None:
    """The first kappa whose rho* differs from rho^kappa by more than ``tolerance`` in effective kappa."""
    return next((row["kappa"] for row in rows if abs(row["kappa_star"] / row["kappa"] - 1) > tolerance), None)


def lightning_run(p: Parabola, kappa: int, noise: torch.Tensor) -> dict:
    """The same chains through ``EMAScalingCallback`` in a Lightning fit: EMA mean and variance after every step."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_emascale import EMAScalingCallback

    class NoisyParabola(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.theta = torch.nn.Parameter(torch.full((noise.shape[1],), p.theta0))

        def training_step(self, batch, batch_idx):
            (xi,) = batch  # the gradient of each chain is a theta + (mean of this batch's noise)
            return (0.5 * p.a * self.theta**2 + xi.mean(0).detach() * self.theta).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=p.lr)  # the base LR: the callback applies kappa x lr

    class Record(L.Callback):
        def __init__(self, ema: EMAScalingCallback) -> None:
            self.ema, self.means, self.variances, self.momenta = ema, [], [], set()

        def on_train_start(self, trainer, pl_module):
            self.on_train_batch_end(trainer, pl_module)

        def on_train_batch_end(self, trainer, pl_module, *args):
            zeta = self.ema.ema_state_dict()["theta"]
            self.means.append(zeta.mean())
            self.variances.append(zeta.var())
            if args:
                self.momenta.add(round(self.ema.ema_momentum, 15))

    ema = EMAScalingCallback(
        momentum=p.momentum, base_batch_size=p.batch, optimizer_rule="sgd", evaluate_with_ema=False
    )
    record = Record(ema)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        callbacks=[ema, record],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(NoisyParabola(), DataLoader(TensorDataset(noise), batch_size=kappa * p.batch))
    (momentum,) = record.momenta
    return {
        "mean_ema": torch.stack(record.means).double(),
        "var_ema": torch.stack(record.variances).double(),
        "kappa": ema.kappa,
        "momentum": momentum,
    }


def plot_moments(p: Parabola, kappas: list[int], simulated: dict, exact: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True, sharey="row")
    colours = plt.cm.viridis(torch.linspace(0, 0.95, len(kappas)).tolist())
    for column, rule in enumerate((True, False)):
        for kappa, colour in zip(kappas, colours):
            samples = torch.arange(p.steps(kappa) + 1) * kappa * p.batch
            for row, key in enumerate(("mean_ema", "var_ema")):
                axis = axes[row, column]
                axis.plot(samples, simulated[rule, kappa][key], color=colour, lw=1.2, label=f"kappa {kappa}")
                axis.plot(samples, exact[rule, kappa][key][:, 0], color="k", lw=0.6, ls=":")
        axes[0, column].set_title(
            ("with the rule: kappa x lr, rho^kappa" if rule else "without it: kappa x lr, rho unchanged"), fontsize=10
        )
        axes[1, column].set_xlabel("samples seen")
    axes[0, 0].set_ylabel("E[EMA]")
    axes[1, 0].set_ylabel("Var[EMA]")
    axes[1, 0].set_yscale("log")
    axes[0, 1].legend(fontsize=7, ncol=2, title="simulated (dotted: exact)", title_fontsize=7)
    fig.suptitle(f"Noisy parabola: a={p.a}, sigma^2={p.sigma2}, B={p.batch}, lr={p.lr}, rho={p.momentum}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_best_momentum(p: Parabola, sweeps: dict[tuple[float, float], list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    rows = sweeps[p.lr, p.momentum]
    kappas = [row["kappa"] for row in rows]
    axes[0].plot(kappas, [1 - row["rho_rule"] for row in rows], "-", color="C0", label="rule: 1 - rho^kappa")
    axes[0].plot(kappas, [1 - row["rho_star"] for row in rows], "o", color="C1", label="best: 1 - rho*(kappa)")
    axes[0].plot(kappas, [1 - p.momentum] * len(rows), "--", color="C3", label="no rule: 1 - rho")
    axes[0].set(xscale="log", yscale="log", xlabel="kappa", ylabel="1 - momentum")
    axes[0].set_title(f"lr {p.lr}, rho {p.momentum}", fontsize=10)
    axes[0].legend(fontsize=8)
    # Which small number decides where the rule departs: the EMA's decay per step or SGD's contraction per step?
    for axis, varied, x_of, x_label in (
        (axes[1], "momentum", lambda r, lr, m: r["kappa"] * (1 - m), "kappa x (1 - rho)"),
        (axes[2], "lr", lambda r, lr, m: r["kappa_lr_a"], "kappa x lr x a"),
    ):
        held = {"lr": p.momentum, "momentum": p.lr}[varied]
        chosen = {key: rows for key, rows in sweeps.items() if key[0 if varied == "momentum" else 1] == held}
        for index, ((lr, momentum), sweep) in enumerate(sorted(chosen.items())):
            x = [x_of(row, lr, momentum) for row in sweep]
            axis.plot(
                x,
                [row["kappa_star"] / row["kappa"] for row in sweep],
                "o-",
                color=f"C{index}",
                label=f"lr {lr}, rho {momentum}",
            )
        axis.axhline(1.0, color="k", lw=0.6)
        axis.axhline(0.95, color="k", lw=0.6, ls=":")
        axis.set(xscale="log", xlabel=x_label, ylabel="kappa* / kappa   (rho* = rho^kappa*)", ylim=(0, 1.1))
        axis.set_title(f"{varied} varied", fontsize=10)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows: list[dict[str, float]]) -> None:
    header = ("kappa", "k*lr*a", "rho^kappa", "rho*", "kappa*", "dist rule", "dist rho*", "dist no rule")
    print("{:>6} {:>7} {:>10} {:>10} {:>8} {:>10} {:>10} {:>12}".format(*header))
    for r in rows:
        print(
            f"{r['kappa']:>6} {r['kappa_lr_a']:>7.4g} {r['rho_rule']:>10.6f} {r['rho_star']:>10.6f} {r['kappa_star']:>8.4g}"
            f" {r['distance_rule']:>10.2e} {r['distance_star']:>10.2e} {r['distance_no_rule']:>12.2e}"
        )


def parse_ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item]


def parse_floats(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Parabola()
    parser.add_argument("--kappas", type=parse_ints, default=[2**i for i in range(11)])
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--momentum", type=float, default=defaults.momentum)
    parser.add_argument("--samples", type=int, default=defaults.samples)
    parser.add_argument("--chains", type=int, default=2048)
    parser.add_argument("--lightning-kappas", type=parse_ints, default=[8, 128])
    parser.add_argument("--sweep-lrs", type=parse_floats, default=[0.0005, 0.004])
    parser.add_argument("--sweep-momenta", type=parse_floats, default=[0.99, 0.9999])
    parser.add_argument("--out-dir", type=Path, default=Path("parabola"))
    args = parser.parse_args()
    if 1 not in args.kappas:
        parser.error(f"--kappas must include the base run 1, got {args.kappas}")
    p = replace(defaults, lr=args.lr, momentum=args.momentum, samples=args.samples)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"problem": asdict(p), "chains": args.chains}

    # (a) moments against samples seen, simulated and exact, with and without the rule
    noise = sample_noise(p, args.chains)
    simulated, exact, moments = {}, {}, []
    for rule in (True, False):
        for kappa in args.kappas:
            lr, momentum = p.scaled(kappa, rule)
            simulated[rule, kappa] = simulate(p, kappa, lr, momentum, noise)
            exact[rule, kappa] = exact_moments(p, kappa, lr, [momentum])
            sim, ex = simulated[rule, kappa], exact[rule, kappa]
            moments.append(
                {
                    "rule": rule,
                    "kappa": kappa,
                    "final_mean_simulated": float(sim["mean_ema"][-1]),
                    "final_mean_exact": float(ex["mean_ema"][-1, 0]),
                    "final_var_simulated": float(sim["var_ema"][-1]),
                    "final_var_exact": float(ex["var_ema"][-1, 0]),
                    "stationary_var": stationary_ema_variance(p, kappa, rule),
                }
            )
    results["moments"] = moments
    print(f"(a) EMA after {p.samples} samples, {args.chains} simulated chains against the exact moments")
    print(
        "{:>8} {:>6} {:>12} {:>12} {:>12} {:>12} {:>14}".format(
            "rule", "kappa", "mean sim", "mean exact", "var sim", "var exact", "var stationary"
        )
    )
    for m in moments:
        print(
            f"{'rho^k' if m['rule'] else 'rho':>8} {m['kappa']:>6} {m['final_mean_simulated']:>12.4e}"
            f" {m['final_mean_exact']:>12.4e} {m['final_var_simulated']:>12.4e} {m['final_var_exact']:>12.4e}"
            f" {m['stationary_var']:>14.4e}"
        )
    plot_moments(p, args.kappas, simulated, exact, args.out_dir / "parabola_moments.png")

    # (b) the best momentum per kappa, for the chosen learning rate and the sweep
    configurations = sorted(
        {(p.lr, p.momentum)}
        | {(lr, p.momentum) for lr in args.sweep_lrs}
        | {(p.lr, momentum) for momentum in args.sweep_momenta}
    )
    sweeps = {(lr, m): study(replace(p, lr=lr, momentum=m), args.kappas) for lr, m in configurations}
    results["best_momentum"] = [{"lr": lr, "momentum": m, "rows": rows} for (lr, m), rows in sweeps.items()]
    print("\n(b) best momentum rho* against rho^kappa; distances: RMS W2 to the base EMA, relative to its size")
    for (lr, momentum), rows in sweeps.items():
        print(f"\nlr {lr}, rho {momentum}:")
        print_table(rows)
    print("\nwhere rho* first departs from rho^kappa by more than 5% in effective kappa:")
    print("{:>8} {:>8} {:>8} {:>12} {:>10}".format("lr", "rho", "kappa", "k*(1-rho)", "k*lr*a"))
    results["departure"] = []
    for (lr, momentum), rows in sweeps.items():
        first = departure(rows)
        results["departure"].append({"lr": lr, "momentum": momentum, "kappa": first})
        if first is None:
            print(f"{lr:>8g} {momentum:>8g} {'none':>8}")
        else:
            print(f"{lr:>8g} {momentum:>8g} {first:>8} {first * (1 - momentum):>12.4g} {first * lr * p.a:>10.4g}")
    plot_best_momentum(p, sweeps, args.out_dir / "parabola_best_momentum.png")

    # (c) the callback in a real Lightning fit, on the same noise as the simulation
    results["lightning"] = []
    for kappa in args.lightning_kappas:
        run = lightning_run(p, kappa, noise)
        sim = simulated[True, kappa]
        row = {
            "kappa": float(run["kappa"]),
            "momentum": float(run["momentum"]),
            "rule_momentum": scale_ema_momentum(p.momentum, kappa),
            "max_abs_mean_difference": float((run["mean_ema"] - sim["mean_ema"]).abs().max()),
            "max_rel_var_difference": float(
                ((run["var_ema"] - sim["var_ema"]) / sim["var_ema"].clamp_min(1e-30)).abs().max()
            ),
            "steps": len(run["mean_ema"]) - 1,
        }
        results["lightning"].append(row)
        print(
            f"\n(c) Lightning fit, kappa {row['kappa']:g}: {row['steps']} steps at rho-hat {row['momentum']:.9f}"
            f" (rho^kappa {row['rule_momentum']:.9f}); EMA vs the simulation on the same noise:"
            f" max |mean difference| {row['max_abs_mean_difference']:.2e}, max relative variance difference"
            f" {row['max_rel_var_difference']:.2e}"
        )
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: the helper package
    from emascale_examples.study import environment

    results = {"args": {**vars(args), "out_dir": str(args.out_dir)}, "environment": environment(), **results}
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out_dir}/parabola_moments.png, parabola_best_momentum.png, results.json")


if __name__ == "__main__":
    main()
