"""Tuning quality: does the default sampler tune at the budgets the sweep files use?

What is compared, at an equal budget per cell (`--trials`, default 8, with `--concurrent`
trials of each cell running at once, default 2), each sampler through the REAL per-cell search
and Tune loop: `sweep.driver.tune_config(spec, optuna_url, num_samples)` (CellSearcher: one
Optuna study per grid cell, the paper-setting first trial, paired random-phase draws, warm start
from the sibling cell; FIFO scheduler: `budget: {epochs: 1, early_stopping: false}`, so nothing
is stopped) on one embedded Ray started once, with a Tune function trainable that evaluates an
objective instead of training. The samplers (sweep-file `optuna:` sections):

- **default**: `optuna: {}` — sampler auto (TPE), startup a third of the trials, constant liar,
  paired draws, warm start;
- **random**: `optuna: {sampler: random}`;
- **old-tpe**: TPE as the project used it before: `{sampler: tpe, n_startup_trials: 10,
  constant_liar: false}`. At 8 trials a cell every trial is in its random phase, whose paired
  draws do not depend on the sampler (sweep.samplers.PairedStart), and warm start never offers
  (it waits for the random phase to end): it runs exactly random's configurations, so its
  regrets equal random's and only its wall time differs;
- **gp**: `optuna: {sampler: gp}` (Optuna's GPSampler, startup a third of the trials).

Each cell's first trial runs the method's paper setting (kd: T = 4, alpha = 0.9) for every
sampler: it is the searcher's (spec.paper_start), not the sampler's, and is kept as shipped. The
default objective's optimum is far from it (printed).

The grid: teacher_loss [ce, mse] x method [kd] x train_attack [pgd] — 2 cells, the fewest that
exercise paired draws and warm start (siblings: same method and attack, other teacher); Ray's
cost is per trial, not per cell. Each repetition (`--seeds`, default 20) is a fresh sweep with
`seed: <repetition>` (sampler seeds, paired draws and the objective's noise change with it) and
a fresh Optuna SQLite file in a temporary folder; Ray is started once for the whole run
(`ray.init(num_cpus=concurrent x cells, include_dashboard=False)`, on loopback as
sweep.driver.init_ray starts it: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray's import).

Regret, per cell and repetition: the objective's noiseless optimum minus the noiseless value of
the configuration the sweep's own rule picks on the NOISY observations (sweep.selection:
`best(from_optuna(trials, rule(spec), epochs), rule(spec))`, as CellSearcher.best_trial does).
Printed per sampler: median, IQR and mean regret over repetitions x cells after all `--trials`
trials and after the cell's first half (trials numbered < trials/2, picked by the same rule);
the ratios of medians default/random, gp/random, default/old-tpe; in how many (repetition, cell)
pairs a sampler beat random; the trials of a cell that were running when each trial was asked
(what constant liar sees), and wall time per sampler.

The objective protocol (`--objective MODULE:NAME`; default: this file's `KDSurface`): NAME is a
callable `f(hp, cell, rng) -> float`, the noisy observed value (maximised; reported to Tune as
the sweep's objective metric, val/robust_acc) of hyperparameters `hp` (the trial's
TrialConfig.hp: every resolved hyperparameter) in cell `cell` (its key, e.g. `mse.kd.pgd`; rng:
a numpy Generator seeded by (trial seed, trial number, cell)), with attributes
- `f.truth(hp, cell) -> float`: the noiseless value;
- `f.optimum(cell) -> float`: the noiseless maximum over the search space;
- `f.search_space` (optional): the sweep file's `search_space:` mapping (default: temperature
  float [1, 8], alpha float [0.1, 0.9], lr log_float [1e-3, 0.3]; lr is a training parameter).
A module that Ray workers cannot import (a file outside the installed packages) is sent to them
by value (cloudpickle.register_pickle_by_value).

The default objective (`KDSurface`, designed before any measurement, not tuned to a result): a
Gaussian bump 0.30 + 0.50 exp(-q/2) on the unit cube of (temperature, alpha, log lr), centred at
(0.62, 0.35, 0.60) (T 5.3, alpha 0.38, lr 0.031), widths 0.30, 0.30, 0.18, with a
temperature-alpha correlation of 0.5 (the interaction: a higher temperature wants a higher
alpha); cell `mse.*` shifts the centre by (+0.08, -0.06, 0) (other teacher losses by a stable
hash in [-0.06, 0.06]), so paired draws and warm start help but do not hand a cell its optimum.
Observation noise: sd 0.01 (2 % of the 0.5 range), like validation accuracy on a few thousand
examples. Its optimum is 0.80 in every cell; the paper setting sits near 0.30-0.35.

`--real`: the quickstart cells on digits (search_spaces/quickstart.yaml: teacher_loss [ce, mse]
x method [kd, ard] x pgd, 8 epochs a trial, ASHA as the file says), real training through the
real sweep (sweep.driver.run_sweep, in this process, on an embedded Ray started by
sweep.driver.init_ray, into a temporary storage folder; teachers trained once and shared by
every run), `--trials` trials a cell, as many at once as the CPUs hold (`--concurrent` is not
used), default vs random, `--seeds` repetitions (default 3 there): the best validation
objective per cell by the sweep's rule. Slow: with `--trials 3` (the quickstart's own budget),
one seed took 639 s for default (the 2 teachers' training included) and 140 s for random on
2 loaded cores; at 8 trials a cell expect ~3x that per sweep.

`--inline` (a cross-check, not the protocol): the same CellSearcher built by tune_config,
driven through its Tune Searcher interface (suggest, on_trial_result, on_trial_complete) in this
process without Ray: `--concurrent` x cells slots kept full, the oldest trial ending first.
Random search gives the same regrets both ways (its draws and the noise depend on the trial
number only); the model-based samplers may differ by the order Tune happens to report in.
`--variant NAME=YAML` adds a column with any sweep-file `optuna:` section (what-ifs, e.g.
`'tpe-s3={n_startup_trials: 3}'`).

    python bench/tuning_quality.py                                # 4 samplers x 20 seeds
    python bench/tuning_quality.py --seeds 5 --samplers default,random
    python bench/tuning_quality.py --trials 16 --concurrent 4
    python bench/tuning_quality.py --objective mypkg.surfaces:bumpy
    python bench/tuning_quality.py --inline --variant 'tpe-s3={n_startup_trials: 3}'
    python bench/tuning_quality.py --real --seeds 1               # real training, one seed

Run time (2 CPU cores, 2026-11-28): the default run, 80 Tuner.fit calls, took 12.4 min with
a load average of 2 to 3 (8 to 10 s a fit) and 28 min while other sessions loaded the machine
(load 7 to 17; ~16 s a fit, ~13 s of it Tune starting the fit's 4 trial actors: fresh worker
processes, each importing Ray Tune). `--inline` with the same samplers and seeds: ~2 min. The
inline regrets matched the Ray runs' (random: equal by construction; default TPE 0.264 vs 0.262
and 0.264). GP's differ between two Ray runs (0.235, 0.257): which trials a cell has finished
when it asks depends on the order Tune reports in.

Why: the issue's acceptance criterion: `python bench/tuning_quality.py` prints the default
sampler's median regret at 8 trials a cell at most 0.7 x random search's on the default
objective (the ratio default/random; gp/random says whether GP should be the default).

Not a test: the regrets depend on the objective, the budget and the seeds; the wall times on the
machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"
METRIC = "val/robust_acc"  # the objective the bench sweeps declare (max)

SAMPLERS: dict[str, dict[str, Any]] = {
    "default": {},
    "random": {"sampler": "random"},
    "old-tpe": {"sampler": "tpe", "n_startup_trials": 10, "constant_liar": False},
    "gp": {"sampler": "gp"},
}

DEFAULT_SPACE = {
    "temperature": {"type": "float", "low": 1.0, "high": 8.0},
    "alpha": {"type": "float", "low": 0.1, "high": 0.9},
    "lr": {"type": "log_float", "low": 1e-3, "high": 0.3},
}


def optuna_section(sampler: str, args: argparse.Namespace) -> dict[str, Any]:
    """The sweep file's `optuna:` section of a sampler of the table (SAMPLERS, or a
    `--variant NAME=YAML` of the command line)."""
    return dict(args.variants.get(sampler, SAMPLERS.get(sampler, {})))


class KDSurface:
    """The default objective (module docstring): a noisy, smooth bump over temperature, alpha
    and log lr with a temperature-alpha interaction, its centre shifted per teacher loss."""

    search_space = DEFAULT_SPACE
    base, height, noise = 0.30, 0.50, 0.01
    centre = np.array([0.62, 0.35, 0.60])
    widths = np.array([0.30, 0.30, 0.18])
    corr = 0.5  # temperature-alpha

    def __init__(self) -> None:
        cov = np.outer(self.widths, self.widths) * np.eye(3)
        cov[0, 1] = cov[1, 0] = self.corr * self.widths[0] * self.widths[1]
        self.precision = np.linalg.inv(cov)

    @staticmethod
    def unit(hp: dict[str, Any]) -> np.ndarray:
        """hp on the unit cube of the default space (lr on a log scale)."""
        s = DEFAULT_SPACE
        t, a, lr = (s["temperature"], s["alpha"], s["lr"])
        return np.array(
            [
                (float(hp["temperature"]) - t["low"]) / (t["high"] - t["low"]),
                (float(hp["alpha"]) - a["low"]) / (a["high"] - a["low"]),
                math.log(float(hp["lr"]) / lr["low"]) / math.log(lr["high"] / lr["low"]),
            ]
        )

    def cell_centre(self, cell: str) -> np.ndarray:
        teacher_loss = cell.split(".")[0]
        if teacher_loss == "ce":
            return self.centre
        if teacher_loss == "mse":
            return self.centre + np.array([0.08, -0.06, 0.0])
        h = zlib.crc32(teacher_loss.encode())
        shift = np.array([((h >> (8 * i)) & 0xFF) / 255 * 0.12 - 0.06 for i in range(3)])
        return self.centre + shift

    def truth(self, hp: dict[str, Any], cell: str) -> float:
        d = self.unit(hp) - self.cell_centre(cell)
        return float(self.base + self.height * math.exp(-0.5 * d @ self.precision @ d))

    def optimum(self, cell: str) -> float:
        return self.base + self.height  # the centre is inside the cube in every cell

    def __call__(self, hp: dict[str, Any], cell: str, rng: np.random.Generator) -> float:
        return self.truth(hp, cell) + float(rng.normal(0.0, self.noise))


class BroadSurface(KDSurface):
    """A second data point, `--objective broad`, added AFTER the default's result was known (so
    not the acceptance figure): the same centres and interaction, but twice the widths and a
    heavy-tailed (Cauchy-like) bump, 0.30 + 0.50 / (1 + q/2), so the surface slopes towards the
    optimum from everywhere in the box, as accuracy does over a decade or two of lr; the default
    is nearly flat away from its bump, where only luck finds it."""

    widths = 2 * KDSurface.widths

    def truth(self, hp: dict[str, Any], cell: str) -> float:
        d = self.unit(hp) - self.cell_centre(cell)
        return float(self.base + self.height / (1.0 + 0.5 * d @ self.precision @ d))


def load_objective(ref: str | None) -> Any:
    """`module:name` (see the protocol in the module docstring), `broad`, or the default
    KDSurface."""
    if not ref:
        return KDSurface()
    if ref == "broad":
        return BroadSurface()
    module_name, _, name = ref.partition(":")
    if not name:
        raise SystemExit(f"--objective {ref!r}: expected MODULE:NAME")
    sys.path.insert(0, os.getcwd())
    module = importlib.import_module(module_name)
    f = getattr(module, name)
    for attr in ("truth", "optimum"):
        if not callable(getattr(f, attr, None)):
            raise SystemExit(f"--objective {ref!r}: needs a callable attribute {attr!r}")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(module)  # workers need not be able to import it
    return f


def noise_rng(config: dict[str, Any]) -> np.random.Generator:
    """The trial's noise: a function of (trial seed, number, cell), so every sampler sees the
    same noise for the same trial number of the same repetition (common random numbers)."""
    return np.random.default_rng(
        [int(config["seed"]), int(config["number"]), zlib.crc32(config["cell"].encode())]
    )


def evaluate(config: dict[str, Any], objective: Any, epochs: int, seconds: float) -> None:
    """The Tune function trainable: the objective instead of training, reported once at the
    last epoch (so CellSearcher tells Optuna COMPLETE). `seconds` keeps the trial running as
    long as that, so that trials of a cell overlap as in a real sweep."""
    from ray import tune

    value = float(objective(dict(config["hp"]), str(config["cell"]), noise_rng(config)))
    time.sleep(seconds)
    tune.report({"epoch": epochs, METRIC: value})


def bench_spec(
    name: str, seed: int, optuna: dict[str, Any], args: argparse.Namespace, space: dict, root: Path
) -> Any:
    from sweep.spec import parse_spec

    return parse_spec(
        {
            "name": name,
            "seed": seed,
            "dataset": {"name": "digits"},
            "grid": {"teacher_loss": ["ce", "mse"], "method": ["kd"], "train_attack": ["pgd"]},
            "search_space": space,
            "objective": {"metric": METRIC, "mode": "max"},
            "budget": {"trials_per_cell": args.trials, "epochs": 1, "early_stopping": False},
            "resources": {"cpus_per_trial": 1, "max_concurrent_trials": args.concurrent * 2},
            "storage": {
                "path": str(root),
                "optuna": f"sqlite:///{root}/{name}/optuna.db",
                "mlflow_tracking_uri": f"sqlite:///{root}/mlflow.db",  # never opened here
            },
            "optuna": optuna,
        }
    )


@dataclass
class CellResult:
    cell: str
    regret: float  # after all trials
    regret_half: float  # after the trials numbered < trials // 2
    overlap: list[int] = field(default_factory=list)  # running trials of the cell at each ask


def picked_truth(spec: Any, trials: list, objective: Any, cell: Any) -> float | None:
    """The noiseless value of the configuration the sweep's rule picks from `trials`."""
    from sweep import selection
    from sweep.space import is_searched

    rule = selection.rule(spec)
    best = selection.best(selection.from_optuna(trials, rule, spec.budget.epochs), rule)
    if best is None:
        return None
    fixed = {k: v for k, v in spec.cell_space(cell.method).items() if not is_searched(v)}
    return objective.truth(fixed | best.first.ref.params, cell.key)  # TrialConfig.hp


def running_at_ask(trials: list) -> list[int]:
    """For each trial of a cell, how many other trials of the cell were running when it was
    asked (Optuna's start and completion times)."""
    out = []
    for t in trials:
        out.append(
            sum(
                1
                for o in trials
                if o.number != t.number
                and o.datetime_start < t.datetime_start
                and (o.datetime_complete is None or o.datetime_complete > t.datetime_start)
            )
        )
    return out


def run_once(
    spec: Any, objective: Any, args: argparse.Namespace, root: Path
) -> tuple[list[CellResult], float]:
    """One sweep of the bench spec through the shipped Tune loop; per-cell regrets."""
    import optuna
    from ray import tune

    from sweep.driver import tune_config
    from sweep.layout import SweepLayout

    layout = SweepLayout.of(spec)
    Path(layout.sweep).mkdir(parents=True, exist_ok=True)
    config = tune_config(spec, layout.optuna_url, spec.tuning_trials())
    t = time.perf_counter()
    if args.inline:
        run_inline(config, spec, objective)
    else:
        trainable = tune.with_resources(
            tune.with_parameters(
                evaluate, objective=objective, epochs=spec.budget.epochs, seconds=args.trial_seconds
            ),
            {"cpu": spec.resources.cpus_per_trial},
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=config,
            run_config=tune.RunConfig(name="tune", storage_path=layout.sweep, verbose=0),
        )
        results = tuner.fit()
        if any(r.error is not None for r in results):
            raise SystemExit(f"a trial failed: {[r.error for r in results if r.error][0]}")
    took = time.perf_counter() - t
    out = []
    half = max(1, spec.budget.trials_per_cell // 2)
    for cell in spec.cells():
        study = optuna.load_study(study_name=layout.study_name(cell.key), storage=layout.optuna_url)
        trials = study.get_trials(deepcopy=False)
        if len(trials) != spec.budget.trials_per_cell:
            raise SystemExit(f"{cell.key}: {len(trials)} trials, not {spec.budget.trials_per_cell}")
        best = picked_truth(spec, trials, objective, cell)
        best_half = picked_truth(spec, [t for t in trials if t.number < half], objective, cell)
        if best is None or best_half is None:
            raise SystemExit(f"{cell.key}: no trial completed")
        opt = objective.optimum(cell.key)
        out.append(CellResult(cell.key, opt - best, opt - best_half, running_at_ask(trials)))
    return out, took


def run_inline(config: Any, spec: Any, objective: Any) -> None:
    """`--inline`: the same searcher (tune_config's CellSearcher) driven through its Tune
    Searcher interface in this process, without Ray: `max_concurrent_trials` slots kept full,
    the oldest running trial ending first (what Tune does with trials of equal length)."""
    from ray.tune.search import Searcher

    searcher = config.search_alg
    running: list[tuple[str, dict]] = []
    n = 0
    while True:
        while len(running) < spec.resources.max_concurrent_trials:
            suggestion = searcher.suggest(f"t{n}")
            if suggestion is None or suggestion == Searcher.FINISHED:
                break
            running.append((f"t{n}", suggestion))
            n += 1
        if not running:
            return
        trial_id, trial = running.pop(0)
        value = float(objective(dict(trial["hp"]), str(trial["cell"]), noise_rng(trial)))
        result = {"epoch": spec.budget.epochs, METRIC: value}
        searcher.on_trial_result(trial_id, result)
        searcher.on_trial_complete(trial_id, result)


def start_ray(num_cpus: int, verbose: bool) -> None:
    """An embedded Ray as sweep.driver.init_ray starts one (loopback, no dashboard, its console
    filters), with `num_cpus` logical CPUs: the trials evaluate a function, and `--concurrent`
    trials of each cell must fit at once. Worker lines reach the console only with --verbose
    (Ray's own SIGTERM noise as each fit ends its actors); a failed trial stops the bench with
    its error either way."""
    import ray

    from sweep.driver import quiet_console

    quiet_console(embedded=True)
    if __name__ != "__main__":  # imported (tests, another script): workers cannot import it
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=verbose,
        configure_logging=False,
    )


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def synthetic(args: argparse.Namespace) -> None:
    objective = load_objective(args.objective)
    space = getattr(objective, "search_space", None) or DEFAULT_SPACE
    names = [s for s in args.samplers.split(",") if s]
    for s in names:
        if s not in SAMPLERS and s not in args.variants:
            raise SystemExit(f"unknown sampler {s!r}; known: {', '.join(SAMPLERS)}")
    root = Path(tempfile.mkdtemp(prefix="kdsweep-tuning-"))
    print(
        f"tuning quality: objective {args.objective or 'KDSurface (default)'}, "
        f"{args.trials} trials a cell, {args.concurrent} of a cell at once, {args.seeds} seeds, "
        f"samplers {', '.join(names)}"
    )
    print(f"{os.cpu_count()} CPUs, load average (1 min) {os.getloadavg()[0]:.2f}, storage {root}")
    try:
        probe = bench_spec("probe", 0, {}, args, space, root)
        cells = probe.cells()
        paper, _ = probe.paper_start("kd")
        from sweep.samplers import describe

        for s in names:
            print(
                f"  {s:8s} {describe(bench_spec('p', 0, optuna_section(s, args), args, space, root))}"
            )
        for cell in cells:
            # the paper trial's lr is a random-phase draw: show the paper setting at the
            # optimum's lr (its best case) and at the space's geometric middle
            print(f"  {cell.key}: optimum {objective.optimum(cell.key):.3f}", end="")
            if isinstance(objective, KDSurface):
                c = objective.cell_centre(cell.key)
                lr = space["lr"]
                best_lr = lr["low"] * (lr["high"] / lr["low"]) ** c[2]
                at = objective.truth(paper | {"lr": best_lr}, cell.key)
                t = 1 + 7 * c[0]
                a = 0.1 + 0.8 * c[1]
                print(
                    f" at T {t:.2f}, alpha {a:.2f}, lr {best_lr:.3g}; paper setting "
                    f"{paper} there: {at:.3f}",
                    end="",
                )
            print()
        if not args.inline:
            t = time.perf_counter()
            start_ray(args.concurrent * len(cells), args.verbose)
            # Tune lets a custom searcher keep one trial waiting for resources; the driver's
            # _fit lets every free slot have one (TUNE_MAX_PENDING_TRIALS_PG): so does the bench
            os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(args.concurrent * len(cells)))
            print(f"ray started in {time.perf_counter() - t:.1f} s")

        results: dict[str, list[CellResult]] = {s: [] for s in names}
        walls: dict[str, float] = dict.fromkeys(names, 0.0)
        fits: dict[str, list[float]] = {s: [] for s in names}
        for seed in range(args.seeds):
            for s in names:  # interleaved: load changes hit every sampler alike
                spec = bench_spec(f"{s}-{seed}", seed, optuna_section(s, args), args, space, root)
                t = time.perf_counter()
                with quiet(args.verbose):
                    cell_results, fit = run_once(spec, objective, args, root)
                walls[s] += time.perf_counter() - t
                fits[s].append(fit)
                results[s].extend(cell_results)
                if not args.keep:
                    shutil.rmtree(root / spec.name, ignore_errors=True)
            line = "  ".join(
                f"{s} {statistics.median(r.regret for r in results[s]):.3f}" for s in names
            )
            print(f"seed {seed:2d} done; median regret so far: {line}", flush=True)
        print_table(args, names, results, walls, fits)
    finally:
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def print_table(
    args: argparse.Namespace,
    names: list[str],
    results: dict[str, list[CellResult]],
    walls: dict[str, float],
    fits: dict[str, list[float]],
) -> None:
    half = max(1, args.trials // 2)
    n = len(next(iter(results.values())))
    print(
        f"\nregret = optimum - true value of the configuration the sweep's rule picks on the "
        f"noisy values; {n} (seed, cell) pairs a sampler"
    )
    w = max(8, *(len(s) for s in names))
    head = (
        f"{'sampler':{w}s} | {'median':>7s} {'IQR':>15s} {'mean':>6s} | "
        f"{'first ' + str(half) + ': median':>15s} {'IQR':>15s} | {'beats random':>12s} | "
        f"{'running at ask':>14s} | {'wall s':>6s} {'per fit':>7s}"
    )
    print(head)
    print("-" * len(head))
    rand = results.get("random")
    for s in names:
        r = results[s]
        lo, med, hi = quantiles([x.regret for x in r])
        lo2, med2, hi2 = quantiles([x.regret_half for x in r])
        mean = statistics.fmean(x.regret for x in r)
        beats = "-"
        if rand is not None and s != "random":
            wins = sum(a.regret < b.regret for a, b in zip(r, rand, strict=True))
            beats = f"{wins}/{len(r)}"
        overlap = [k for x in r for k in x.overlap]
        print(
            f"{s:{w}s} | {med:7.3f} [{lo:6.3f}, {hi:6.3f}] {mean:6.3f} | "
            f"{med2:15.3f} [{lo2:6.3f}, {hi2:6.3f}] | {beats:>12s} | "
            f"{statistics.fmean(overlap):14.2f} | {walls[s]:6.1f} {statistics.median(fits[s]):7.2f}"
        )

    def ratio(a: str, b: str) -> None:
        if a not in results or b not in results:
            return
        ra = np.array([x.regret for x in results[a]]).reshape(args.seeds, -1)
        rb = np.array([x.regret for x in results[b]]).reshape(args.seeds, -1)
        ha = statistics.median(x.regret_half for x in results[a])
        hb = statistics.median(x.regret_half for x in results[b])
        # 95 % bootstrap interval of the ratio: seeds resampled (a seed's cells together)
        rng = np.random.default_rng(0)
        boot = []
        for _ in range(2000):
            pick = rng.integers(0, args.seeds, args.seeds)
            boot.append(np.median(ra[pick]) / max(np.median(rb[pick]), 1e-12))
        lo, hi = np.percentile(boot, [2.5, 97.5])
        print(
            f"median regret {a}/{b}: {np.median(ra) / np.median(rb):.2f} "
            f"[{lo:.2f}, {hi:.2f}] after {args.trials} trials, {ha / hb:.2f} after {half}"
        )

    print()
    ratio("default", "random")
    ratio("gp", "random")
    ratio("default", "old-tpe")
    for v in args.variants:
        ratio(v, "random")
    print(
        f"(per fit: median seconds of one {'inline loop' if args.inline else 'Tuner.fit'} of "
        "2 cells; wall s: the sampler's whole share, spec and study read-back included; "
        "[ ]: 95 % bootstrap interval over seeds)"
    )


@contextlib.contextmanager
def quiet(verbose: bool) -> Iterator[None]:
    """Tune's and Ray's own lines to /dev/null unless --verbose (worker lines come through the
    driver's stderr)."""
    if verbose:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        yield


def real(args: argparse.Namespace) -> None:
    """The quickstart through the real sweep (run_sweep), default vs random."""
    from sweep import selection
    from sweep.layout import SweepLayout
    from sweep.spec import parse_spec

    names = [s for s in args.samplers.split(",") if s]
    base = yaml.safe_load(QUICKSTART.read_text())
    root = Path(tempfile.mkdtemp(prefix="kdsweep-tuning-real-"))
    log = root / "output.log"
    print(
        f"tuning quality (real): {QUICKSTART.name} on digits, {args.trials} trials a cell, "
        f"{args.seeds} seeds, samplers {', '.join(names)}; storage {root}, sweep output in {log}"
    )
    print(f"{os.cpu_count()} CPUs, load average (1 min) {os.getloadavg()[0]:.2f}", flush=True)
    from sweep.driver import init_ray, run_sweep

    init_ray(None)
    best: dict[str, dict[str, list[float]]] = {s: {} for s in names}
    walls: dict[str, list[float]] = {s: [] for s in names}
    try:
        for seed in range(args.seeds):
            for s in names:
                data = dict(base)
                data |= {
                    "name": f"{s}-{seed}",
                    "seed": seed,
                    "budget": base["budget"] | {"trials_per_cell": args.trials},
                    "optuna": optuna_section(s, args),
                    "storage": {
                        "path": str(root),
                        "teachers": str(root / "teachers"),  # trained once, shared
                        "mlflow_tracking_uri": f"sqlite:///{root}/mlflow.db",
                    },
                }
                spec = parse_spec(data)
                t = time.perf_counter()
                with open(log, "a") as f, contextlib.redirect_stdout(f):
                    ok = run_sweep(spec)
                walls[s].append(time.perf_counter() - t)
                if not ok:
                    raise SystemExit(f"sweep {spec.name} did not finish; see {log}")
                import optuna

                layout = SweepLayout.of(spec)
                rule = selection.rule(spec)
                for cell in spec.cells():
                    study = optuna.load_study(
                        study_name=layout.study_name(cell.key), storage=layout.optuna_url
                    )
                    trials = study.get_trials(deepcopy=False)
                    b = selection.best(
                        selection.from_optuna(trials, rule, spec.budget.epochs), rule
                    )
                    best[s].setdefault(cell.key, []).append(b.score if b else float("nan"))
                print(f"seed {seed} {s}: {walls[s][-1]:.0f} s", flush=True)
        cells = list(next(iter(best.values())))
        metric = base["objective"]["metric"]
        print(
            f"\nbest validation {metric} per cell by the sweep's rule (mean over {args.seeds} seeds)"
        )
        diff = "default - random" if {"default", "random"} <= set(names) else ""
        print(f"{'cell':16s} " + " ".join(f"{s:>9s}" for s in names) + f"  {diff}")
        for c in cells:
            row = " ".join(f"{statistics.fmean(best[s][c]):9.4f}" for s in names)
            if diff:
                d = [a - b for a, b in zip(best["default"][c], best["random"][c], strict=True)]
                row += (
                    f"  {statistics.fmean(d):+.4f} (per seed: {', '.join(f'{x:+.4f}' for x in d)})"
                )
            print(f"{c:16s} {row}")
        for s in names:
            per = ", ".join(f"{w:.0f}" for w in walls[s])
            print(f"{s}: {sum(walls[s]):.0f} s for {len(walls[s])} sweeps ({per} s)")
        print(f"(the first sweep, {names[0]}-0, also trained the teachers every sweep shares)")
    finally:
        import ray

        ray.shutdown()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=8, help="trials a cell (budget.trials_per_cell)")
    p.add_argument("--concurrent", type=int, default=2, help="trials of a cell at once")
    p.add_argument("--seeds", type=int, default=None, help="repetitions (20; 3 with --real)")
    p.add_argument("--samplers", default=None, help=f"comma-separated, of {', '.join(SAMPLERS)}")
    p.add_argument("--objective", default=None, help="MODULE:NAME (protocol in the docstring)")
    p.add_argument(
        "--trial-seconds",
        type=float,
        default=0.5,
        help="how long a trial runs, so that a cell's trials overlap as in a sweep",
    )
    p.add_argument(
        "--inline",
        action="store_true",
        help="drive the same CellSearcher in this process, without Ray/Tune (fast cross-check)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=YAML",
        help="a further sampler column: NAME and its sweep-file `optuna:` section, e.g. "
        "'tpe-s3={n_startup_trials: 3}' (what-ifs; repeatable)",
    )
    p.add_argument("--real", action="store_true", help="the quickstart with real training")
    p.add_argument("--keep", action="store_true", help="keep the temporary storage")
    p.add_argument("--verbose", action="store_true", help="Ray's and Tune's own lines too")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = 3 if args.real else 20
    if args.samplers is None:
        args.samplers = "default,random" if args.real else ",".join(SAMPLERS)
    args.variants = {}
    for v in args.variant:
        name, _, section = v.partition("=")
        parsed = yaml.safe_load(section) if section else None
        if not name or not isinstance(parsed, dict):
            p.error(f"--variant {v!r}: expected NAME=YAML mapping")
        args.variants[name] = parsed
        args.samplers += f",{name}"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # an embedded Ray on loopback only; read when Ray is imported (as sweep.cli.main sets it)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    t = time.perf_counter()
    (real if args.real else synthetic)(args)
    print(f"total wall time {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
