"""Shared test fixtures. Ray stays on loopback (DESIGN §3.8)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
torch.set_num_threads(1)


def sweep_cli(cwd, *args: str) -> subprocess.CompletedProcess:
    """`sweep ARGS` as a user runs it, in `cwd`, on an embedded Ray (no RAY_ADDRESS)."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "sweep.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def tiny_spec_dict(tmp_path, **over):
    """A sweep small enough for a test: 2 teacher losses x 2 methods, 2 trials, 2 epochs."""
    spec = {
        "name": "tiny",
        "seed": 0,
        "dataset": {"name": "digits"},
        "teacher": {"epochs": 2},
        "grid": {"teacher_loss": ["ce", "mse"], "method": ["kd", "ard"], "train_attack": ["pgd"]},
        "threat": {"eps": 0.1},
        "train_attack": {"steps": 2},
        "search_space": {
            "temperature": {"type": "float", "low": 1.0, "high": 4.0},
            "alpha": {"type": "float", "low": 0.2, "high": 0.8},
        },
        "budget": {"trials_per_cell": 2, "epochs": 2, "grace_period": 2},
        "evaluation": {
            "attacks": ["fgsm", "pgd20"],
            "val_attack": "pgd5",
            "val_examples": 100,
            "test_examples": 100,
        },
        "resources": {"cpus_per_trial": 1},
        "storage": {
            "path": str(tmp_path / "sweeps"),
            "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        },
    }
    for k, v in over.items():
        spec[k] = v
    return spec


@pytest.fixture
def tiny_spec(tmp_path):
    return tiny_spec_dict(tmp_path)


class LinearLogits(nn.Module):
    """A 'network' whose logits are a known linear map of the input, so formulas (and which of
    x or x' a loss feeds to which network) can be checked by hand."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w


def py_softmax(row: list[float], temp: float = 1.0) -> list[float]:
    """softmax(row / temp) in plain Python floats: hand computations independent of torch."""
    z = [v / temp for v in row]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def py_kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) of two probability lists, in plain Python floats (0 * log 0 = 0)."""
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True) if a > 0)
