"""The sweep's measurement protocol: a cheap check on the validation split every epoch (what
Optuna and ASHA see), and the full attack suite on the test split once (never tuned on).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .data import Splits
from .evaluate import accuracy, evaluate_suite
from .spec import SweepSpec


def val_subset(spec: SweepSpec, data: Splits) -> tuple[torch.Tensor, torch.Tensor]:
    n = spec.evaluation.val_examples or len(data.x_val)
    return data.x_val[:n], data.y_val[:n]


def validation_metrics(spec: SweepSpec, model: nn.Module, data: Splits) -> dict[str, float]:
    """The cheap per-epoch check that Optuna and ASHA see: validation split only."""
    x, y = val_subset(spec, data)
    ev = spec.evaluation
    with torch.no_grad():
        model.eval()
        logits = torch.cat(
            [model(x[i : i + ev.batch_size]) for i in range(0, len(x), ev.batch_size)]
        )
        val_loss = torch.nn.functional.cross_entropy(logits, y).item()
    clean = logits.argmax(1) == y
    return {
        "val/clean_acc": int(clean.sum()) / max(len(y), 1),  # as `accuracy` counts
        "val/robust_acc": accuracy(
            model,
            x,
            y,
            attack=ev.val_attack,
            eps=spec.threat.eps,
            norm=spec.threat.norm,
            batch_size=ev.batch_size,
            clean=clean,
        ),
        "val/loss": val_loss,
    }


def test_metrics(
    spec: SweepSpec,
    model: nn.Module,
    data: Splits,
    *,
    state_dir: Path | None = None,
    flags: list[str] | None = None,
) -> dict[str, float]:
    """The full suite on the test split: computed once per finished trial, never tuned on.
    AutoAttack progress is kept in `state_dir` (resumed if interrupted)."""
    n = spec.evaluation.test_examples or len(data.x_test)
    return evaluate_suite(
        model,
        data.x_test[:n],
        data.y_test[:n],
        spec.evaluation.attacks,
        eps=spec.threat.eps,
        norm=spec.threat.norm,
        batch_size=spec.evaluation.batch_size,
        state_dir=state_dir,
        flags=flags,
    )
