"""The benchmarks' own accounting, checked fast (the benchmarks themselves are not tests)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from sweep.fast import OFF, FastPath
from sweep.models import build_model

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str) -> ModuleType:
    """bench/NAME.py as a module (bench/ is scripts, not a package)."""
    if f"bench_{name}" in sys.modules:
        return sys.modules[f"bench_{name}"]
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_at_flops_counted_on_the_trial_step_match_the_accounting():
    """F counted on a forward; the whole PGD-k step counted (through autograd.grad, which
    FlopCounterMode's module tracker breaks) is (2k + 3) F less the first convolution's input
    gradient: attack steps 2F (no weight gradients), the outer step ~3F."""
    at = _load("at_throughput")
    torch.manual_seed(0)
    data = at.random_splits(8, torch.device("cpu"))
    info = data.info
    model = build_model("resnet18", in_channels=3, num_classes=10, mean=info.mean, std=info.std)
    f = at.forward_flops(model, data.x_train[:2])
    assert 1.0e9 < f < 1.2e9  # ResNet-18, CIFAR stem, 32x32
    k = 2
    method, attack = at.pgd_at_cell(k)
    step = at.student_step_loss(method, model, [], attack, OFF)
    counted = at.step_flops(model, step, data, OFF)
    assert (2 * k + 3) * f * 0.99 < counted <= (2 * k + 3) * f
    assert all(p.grad is None for p in model.parameters())  # counting left no gradients


def test_at_bench_trains_through_the_trials_student_epoch_on_its_fast_path(monkeypatch):
    """The bench times the trial's own step (sweep.training.student_epoch), with bf16 scoped to
    each network's forward as in a trial (no autocast around the step: the forward is entered
    with autocast off and the Classifier switches it on inside), channels_last weights, and the
    per-model dtype restored after the epoch."""
    at = _load("at_throughput")
    calls, seen = [], []
    real = at.student_epoch

    def spy(*args, **kw):
        calls.append(kw["fast"])
        return real(*args, **kw)

    monkeypatch.setattr(at, "student_epoch", spy)
    torch.manual_seed(0)
    fp = at.fast_path(bf16=True, channels_last=True, compile=False)
    assert fp == FastPath(dtype=torch.bfloat16, channels_last=True)
    trial = at.TrialTraining(torch.device("cpu"), fp, batch=2, steps=1, batches=1)
    model = trial.model
    model.register_forward_pre_hook(
        lambda m, a: seen.append((m.compute_dtype, torch.is_autocast_enabled("cpu")))
    )
    trial.run(1)
    assert calls == [fp]
    assert seen and all(s == (torch.bfloat16, False) for s in seen)  # attack + loss forwards
    assert model.compute_dtype is None and model.channels_last
    conv = next(p for p in model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_overhead_loop_stops_a_trial_the_way_ray_does():
    """Ray stops a trial ASHA stopped by raising SystemExit in its report; run_trial catches
    Exception only, so the loop's stop must not be an Exception either."""
    ov = _load("sweep_overhead")
    assert issubclass(ov.StopAtEpoch, SystemExit)
    assert not issubclass(ov.StopAtEpoch, Exception)


def test_tuning_quality_regret_is_the_truth_of_what_the_sweeps_rule_picks(tmp_path):
    """The bench's regret: the objective's optimum (its noiseless maximum, at the cell's centre,
    away from kd's paper setting) minus the noiseless value of the trial the sweep's rule picks
    on the noisy values; a cell's 'running at ask' counts its trials started and not ended."""
    import datetime

    import numpy as np
    import optuna

    tq = _load("tuning_quality")
    f = tq.KDSurface()
    args = tq.parse_args(["--seeds", "1"])
    spec = tq.bench_spec("t", 0, tq.SAMPLERS["default"], args, tq.DEFAULT_SPACE, tmp_path)
    assert [c.key for c in spec.cells()] == ["ce.kd.pgd", "mse.kd.pgd"]
    cell = spec.cells()[1]
    c = f.cell_centre(cell.key)
    top = {"temperature": 1 + 7 * c[0], "alpha": 0.1 + 0.8 * c[1], "lr": 1e-3 * 300 ** c[2]}
    assert abs(f.truth(top, cell.key) - f.optimum(cell.key)) < 1e-9
    paper, _ = spec.paper_start("kd")
    assert f.optimum(cell.key) - f.truth(paper | {"lr": top["lr"]}, cell.key) > 0.4
    rng = np.random.default_rng(0)
    for _ in range(200):
        hp = {"temperature": rng.uniform(1, 8), "alpha": rng.uniform(0.1, 0.9)}
        hp["lr"] = float(np.exp(rng.uniform(np.log(1e-3), np.log(0.3))))
        assert f.truth(hp, cell.key) <= f.optimum(cell.key)
    config = {"seed": 3, "number": 2, "cell": cell.key}
    assert tq.noise_rng(config).normal() == tq.noise_rng(config).normal()

    lucky = {"temperature": 2.0, "alpha": 0.8, "lr": 0.2}  # worse truly, better observed
    t0 = datetime.datetime(2026, 1, 1)
    dist = {k: optuna.distributions.FloatDistribution(0, 10) for k in top}
    trials = [
        optuna.trial.create_trial(
            params=hp,
            distributions=dist,
            value=f.truth(hp, cell.key) + bump,
        )
        for hp, bump in ((top, 0.0), (lucky, 0.9))
    ]
    for i, t in enumerate(trials):
        t.number = i
        t.datetime_start = t0 + datetime.timedelta(seconds=i)
        t.datetime_complete = t0 + datetime.timedelta(seconds=5)
    regret = f.optimum(cell.key) - tq.picked_truth(spec, trials, f, cell)
    assert abs(regret - (f.optimum(cell.key) - f.truth(lucky, cell.key))) < 1e-9
    assert tq.running_at_ask(trials) == [0, 1]
