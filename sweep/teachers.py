"""Teacher losses, teacher training, and the teacher cache.

Why a cache keyed by content: every student trial of a cell needs the same teacher; training it
per trial would multiply the sweep's cost. A teacher's identity is a hash of everything that
defines it, so it is trained once per sweep (a file lock serialises trials that start together)
and found again by later sweeps that ask for the same teacher.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherLoss:
    """A teacher's training loss: fn(logits, labels, **params) -> scalar."""

    fn: Callable[..., torch.Tensor]
    summary: str
    params: dict[str, Any] = field(default_factory=dict)  # name -> default


TEACHER_LOSSES: Registry[TeacherLoss] = Registry("teacher loss")


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def mse_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Hamidi et al. (ECCV 2024): squared error between the softmax probabilities and the one-hot
    label, summed over classes and averaged over the batch. On probabilities, not logits."""
    p = logits.softmax(dim=1)
    onehot = F.one_hot(y, num_classes=logits.shape[1]).to(p.dtype)
    return (p - onehot).pow(2).sum(dim=1).mean()


TEACHER_LOSSES.register("ce")(TeacherLoss(ce_loss, "cross-entropy (maximum likelihood)"))
TEACHER_LOSSES.register("mse")(
    TeacherLoss(
        mse_loss, "MSE between softmax probabilities and one-hot labels (Hamidi et al. 2024)"
    )
)


def teacher_hash(identity: dict[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class TeacherRecord:
    """What the cache knows about one trained teacher."""

    hash: str
    identity: dict[str, Any]
    metrics: dict[str, float]
    path: Path


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class TeacherCache:
    """Teachers on disk: `<root>/<hash>/teacher.pt` and `meta.json` (with the file's sha256)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _load(self, h: str, model: nn.Module) -> TeacherRecord | None:
        d = self.root / h
        meta_path, weights = d / "meta.json", d / "teacher.pt"
        if not (meta_path.exists() and weights.exists()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if _sha256(weights) != meta["sha256"]:
                raise ValueError("checksum mismatch")
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except Exception as e:  # corrupt or truncated: retrain rather than crash a trial
            log.warning("cached teacher %s is unusable (%s); retraining it", h, e)
            return None
        return TeacherRecord(h, meta["identity"], meta["metrics"], weights)

    def _store(self, h: str, identity: dict, model: nn.Module, metrics: dict) -> TeacherRecord:
        d = self.root / h
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"teacher.pt.tmp{os.getpid()}"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, d / "teacher.pt")
        meta = {"identity": identity, "metrics": metrics, "sha256": _sha256(d / "teacher.pt")}
        (d / "meta.json.tmp").write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(d / "meta.json.tmp", d / "meta.json")
        return TeacherRecord(h, identity, metrics, d / "teacher.pt")

    def get_or_train(
        self,
        identity: dict[str, Any],
        model: nn.Module,
        train: Callable[[nn.Module], dict[str, float]],
        on_ready: Callable[[TeacherRecord, bool], None] | None = None,
    ) -> TeacherRecord:
        """Load the teacher into `model`, training it first if no valid copy exists.

        `on_ready(record, trained)` runs while the lock is held, so per-sweep bookkeeping (one
        MLflow run per teacher) is race-free too."""
        h = teacher_hash(identity)
        with _locked(self.root / f"{h}.lock"):
            record = self._load(h, model)
            trained = record is None
            if record is None:
                metrics = train(model)
                record = self._store(h, identity, model, metrics)
            if on_ready is not None:
                on_ready(record, trained)
        return record
