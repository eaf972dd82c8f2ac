"""What a trial and a teacher's training share: the sweep's context, and the device, data,
models and optimiser settings built from it in a worker.

Plain Python: Ray reaches the trial only through the `report` callback that the driver passes
in, so trials and teachers also run in a loop (bench/) or a test without Ray.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checkpoints import TrialCheckpoints
from .data import Splits, load_splits, make_augmentation
from .fast import FastPath, prepare, resolve
from .layout import SweepLayout
from .models import build_model
from .spec import TRAINING_PARAMS, SweepSpec
from .tracking import Tracker


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares, resolved once by the driver."""

    spec: SweepSpec
    layout: SweepLayout
    tracking_uri: str
    experiment: str
    parent_run_id: str | None
    sweep_id: str | None = None  # state.json's; None for a sweep from before ids (tracking.py)

    def tracker(self) -> Tracker:
        return _tracker(self.tracking_uri, self.experiment, self.sweep_id)

    def checkpoints(self) -> TrialCheckpoints:
        return TrialCheckpoints(self.layout.trials)


@functools.lru_cache(maxsize=4)
def _tracker(uri: str, experiment: str, sweep_id: str | None) -> Tracker:
    return Tracker(uri, experiment, sweep_id=sweep_id)


@functools.lru_cache(maxsize=2)
def _cached_splits(device: str, **kw: Any) -> Splits:
    """Reused Ray actors load a dataset once, not once per trial, and keep it on the trial's
    device: on a GPU the whole dataset stays there as tensors (batches, augmentation and
    attacks never touch the host), and is not copied again for each trial."""
    return load_splits(**kw).to(device)


def get_splits(spec: SweepSpec, device: torch.device) -> Splits:
    d = spec.dataset
    return _cached_splits(
        str(device),
        name=d.name,
        data_dir=d.data_dir,
        download=d.download,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        split_seed=d.split_seed,
    )


def pick_device(spec: SweepSpec) -> torch.device:
    if spec.resources.gpus_per_trial > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def new_model(
    arch: str, data: Splits, device: torch.device, fast: FastPath | None = None
) -> nn.Module:
    """A freshly initialised network on `device`, in the memory format `fast` asks for."""
    info = data.info
    model = build_model(
        arch, in_channels=info.shape[0], num_classes=info.num_classes, mean=info.mean, std=info.std
    ).to(device)
    return prepare(model, fast) if fast is not None else model


def fast_path(spec: SweepSpec, device: torch.device) -> FastPath:
    """The trial's `compute:` settings resolved on its device (auto: bf16 + channels_last on
    CUDA, plain fp32 on a CPU)."""
    return resolve(spec.compute, device)


def optim_settings(optim: Any, hp: dict[str, Any] | None = None) -> dict[str, Any]:
    out = optim.model_dump()
    for k in TRAINING_PARAMS:
        if hp and k in hp:
            out[k] = hp[k]
    return out


def augmentation(spec: SweepSpec, data: Splits) -> Any:
    d = spec.dataset
    return make_augmentation(data.info, basic=d.augment, strong=d.strong_augment)
