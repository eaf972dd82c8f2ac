"""The benchmarks' own accounting, checked fast (the benchmarks themselves are not tests)."""

from __future__ import annotations

import importlib.util
import sys
from contextlib import nullcontext
from pathlib import Path
from types import ModuleType

import torch

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
    step = at.trial_step_loss(model, k, nullcontext, torch.contiguous_format)
    counted = at.step_flops(model, step, data)
    assert (2 * k + 3) * f * 0.99 < counted <= (2 * k + 3) * f
    assert all(p.grad is None for p in model.parameters())  # counting left no gradients


def test_overhead_loop_stops_a_trial_the_way_ray_does():
    """Ray stops a trial ASHA stopped by raising SystemExit in its report; run_trial catches
    Exception only, so the loop's stop must not be an Exception either."""
    ov = _load("sweep_overhead")
    assert issubclass(ov.StopAtEpoch, SystemExit)
    assert not issubclass(ov.StopAtEpoch, Exception)
