"""The teacher cache: trained teachers stored by content hash, trained once, shared by sweeps.

Why a cache keyed by content: every student trial of a cell needs the same teacher; training it
per trial would multiply the sweep's cost. A teacher's identity is a hash of everything that
defines it, so it is trained once per sweep (a file lock serialises trials that start together)
and found again by later sweeps that ask for the same teacher.

The store is a local folder or any pyarrow filesystem URI (`s3://bucket/sweeps/teachers`,
`gs://...`, `file:///...`). Files are read whole and checked against the sha256 in their
metadata before `torch.load(weights_only=True)`: a truncated or corrupted file is retrained,
never unpickled. Teacher losses themselves live in teacher_losses.py.

A teacher starts from scratch, from its parent (a fine-tune: the parent is got first, cached and
recorded like any teacher, and its weights are the child's start), or from a checkpoint file
(checkpoint_formats.py: sha256-verified, then loaded; nothing is trained). Its identity says
which, recursively, and its MLflow run says so too (`source`, `finetuned_from`, `checkpoint_*`).

Below the cache: what defines a sweep's teacher (its identity, hashed), how it is trained and
measured, and `get_teacher`, which finds it in the cache or trains it and records it as the
sweep's MLflow teacher run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint_formats import CheckpointError, check_sha256, load_state
from .cmi import output_metrics
from .context import SweepContext, augmentation, fast_path, new_model, optim_settings
from .data import Splits
from .fast import to_format
from .measure import test_metrics, val_subset, validation_metrics
from .spec import SweepSpec
from .store import Store, absolute, is_remote, locked
from .teacher_defs import TeacherDef
from .teacher_losses import TEACHER_LOSSES
from .training import fast_epoch, make_optimization, seed_everything

log = logging.getLogger(__name__)


def teacher_hash(identity: dict[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


@dataclass
class TeacherRecord:
    """What the cache knows about one teacher, and what happened when it was asked for:
    `event` is "trained" (no copy existed; "loaded" for a teacher made from a checkpoint
    file), "cached" (a valid copy was loaded from the cache) or "retrained" (a copy existed but
    was unusable; `problem` says why)."""

    hash: str
    identity: dict[str, Any]
    metrics: dict[str, float]
    location: str
    event: str = "cached"
    problem: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def trained(self) -> bool:
        return self.event != "cached"


class TeacherCache:
    """Teachers under `<root>/<hash>/`: `teacher.pt` (a state_dict) and `meta.json` (identity,
    metrics, the file's sha256, and the history of cache events)."""

    def __init__(self, root: str | Path) -> None:
        self.store = Store(str(root))

    def _meta(self, h: str) -> dict[str, Any] | None:
        blob = self.store.read(h, "meta.json")
        try:
            return json.loads(blob) if blob is not None else None
        except ValueError:
            return None

    def _load(self, h: str, model: nn.Module) -> tuple[TeacherRecord | None, str | None]:
        """(record, None) if a valid copy was loaded; (None, why) if there is none or it is bad."""
        meta_blob = self.store.read(h, "meta.json")
        weights = self.store.read(h, "teacher.pt")
        if meta_blob is None and weights is None:
            return None, None
        try:
            if meta_blob is None or weights is None:
                raise ValueError("teacher.pt or meta.json is missing")
            meta = json.loads(meta_blob)
            if _sha256(weights) != meta["sha256"]:
                raise ValueError(
                    f"checksum mismatch ({len(weights)} bytes on disk): truncated or corrupted"
                )
            state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as e:  # never crash a trial on a bad cache file: retrain instead
            return None, f"{type(e).__name__}: {e}"
        record = TeacherRecord(
            h,
            meta["identity"],
            meta["metrics"],
            self.store.location(h),
            "cached",
            None,
            meta.get("history", []),
        )
        return record, None

    def _store(
        self, h: str, identity: dict, model: nn.Module, metrics: dict, history: list[dict]
    ) -> None:
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        weights = buf.getvalue()
        self.store.write(weights, h, "teacher.pt")
        meta = {
            "identity": identity,
            "metrics": metrics,
            "sha256": _sha256(weights),
            "history": history,
        }
        self.store.write(json.dumps(meta, indent=2, sort_keys=True).encode(), h, "meta.json")

    def load(self, h: str, model: nn.Module) -> TeacherRecord:
        """Load the cached teacher `h` into `model` (for analysis); an unusable copy raises."""
        record, problem = self._load(h, model)
        if record is None:
            raise FileNotFoundError(
                f"teacher {h} under {self.store.uri}: {problem or 'not in the cache'}"
            )
        return record

    def get_or_train(
        self,
        identity: dict[str, Any],
        model: nn.Module,
        train: Callable[[nn.Module], dict[str, float]],
        on_ready: Callable[[TeacherRecord], None] | None = None,
        made: str = "trained",
    ) -> TeacherRecord:
        """Load the teacher into `model`, training it first if no valid copy exists.

        `on_ready(record)` runs while the lock is held, so per-sweep bookkeeping (one MLflow
        run per teacher) is race-free too. `made`: the event's name when `train` makes it
        ("loaded" when it reads a checkpoint file)."""
        h = teacher_hash(identity)
        with locked(self.store.lock_path(f"{h}.lock")):
            record, problem = self._load(h, model)
            if record is None:
                event = "retrained" if problem else made
                if problem:
                    msg = f"cached teacher {h} is unusable ({problem}); retraining it"
                    log.warning(msg)
                    print(f"warning: {msg}", flush=True)  # Ray shows worker stdout
                old = self._meta(h) or {}
                history = list(old.get("history", [])) if isinstance(old, dict) else []
                history.append(
                    {"event": event, "time": time.time(), "host": os.uname().nodename}
                    | ({"problem": problem} if problem else {})
                )
                metrics = train(model)
                self._store(h, identity, model, metrics, history)
                record = TeacherRecord(
                    h, identity, metrics, self.store.location(h), event, problem, history
                )
            if on_ready is not None:
                on_ready(record)
        return record


# --- a sweep's teachers: identity, training, the cache and the MLflow run -----------------------
def teacher_identity(spec: SweepSpec, t: TeacherDef) -> dict[str, Any]:
    """Everything that defines a teacher, and nothing that does not (paths, sweep name, label,
    a checkpoint's URI: moving the file must not retrain).

    Fine-tuned: its own loss, epochs, optim and seed, plus its parent's identity (recursively)
    under `finetuned_from`. Loaded: the checkpoint's sha256 and format (and the architecture it
    is loaded into); no loss, optim, epochs or seed, which do not change the weights. The
    dataset stays in both: the cache keeps the teacher's metrics, measured on it."""
    d = spec.dataset
    dataset = {
        "name": d.name,
        "val_fraction": d.val_fraction,
        "test_fraction": d.test_fraction,
        "split_seed": d.split_seed,
        "augment": d.augment,
        "crop_padding": "zeros",  # teachers cached under reflect padding are not reused
    } | ({"strong_augment": d.strong_augment} if d.strong_augment != "none" else {})
    if t.checkpoint is not None:
        return {
            "dataset": dataset,
            "arch": t.arch,
            "checkpoint": {"sha256": t.checkpoint.sha256, "format": t.checkpoint.format},
        }
    ident = {
        "dataset": dataset,
        "arch": t.arch,
        "loss": t.loss,
        "loss_params": t.params_dict(),
        "epochs": t.epochs,
        "optim": spec.teacher.optim.model_dump() | t.optim_dict(),
        "seed": t.seed,
    }
    if t.init is not None:
        ident["finetuned_from"] = teacher_identity(spec, t.init)
    return ident


def teacher_metrics(spec: SweepSpec, model: nn.Module, data: Splits) -> dict[str, float]:
    """How the seed papers compare teachers: accuracy, robustness, and CMI / NCMI of the output
    distributions on the validation split."""
    x, y = val_subset(spec, data)
    info = output_metrics(model, x, y, batch_size=spec.evaluation.batch_size)
    return {
        **validation_metrics(spec, model, data),
        **{f"val/{k}": v for k, v in info.items()},
        **test_metrics(spec, model, data),
    }


def train_teacher(
    spec: SweepSpec, t: TeacherDef, model: nn.Module, data: Splits
) -> dict[str, float]:
    """Train `model` (freshly initialised by get_teacher, or holding its parent's weights for a
    fine-tune) with `t`'s loss, epochs and optimiser settings (the sweep's teacher.optim with
    `t.optim` on top)."""
    objective = TEACHER_LOSSES.get(t.loss)(t.params_dict(), data.info.num_classes)
    optim = optim_settings(spec.teacher.optim) | t.optim_dict()
    opt, sched = make_optimization(model, optim, t.epochs, len(data.x_train))
    augment = augmentation(spec, data)
    objective.begin(model, data.x_train, data.y_train, optim["batch_size"], augment)
    # the teacher's training steps take the fast path too (not compiled: trained once per sweep)
    fast = fast_path(spec, data.x_train.device)
    for epoch in range(t.epochs):
        loss_value = fast_epoch(
            model,
            data,
            fast=fast,
            batch_size=optim["batch_size"],
            augmentation=augment,
            step_loss=lambda x, y: objective.loss(model, to_format(x, fast), y),
            optimizer=opt,
            schedule=sched,
        )
        objective.end_epoch()
        # Ray forwards every worker's stdout to the driver's console: one line there per teacher
        # (printed); each epoch is logged at INFO, for whoever configures logging to see it
        if epoch + 1 == t.epochs:
            how = "fine-tuned" if t.init is not None else "trained"
            print(f"teacher {t.label}: {how} {t.epochs} epochs, loss {loss_value:.4f}", flush=True)
        else:
            log.info("teacher %s: epoch %d/%d loss %.4f", t.label, epoch + 1, t.epochs, loss_value)
    model.eval()
    return teacher_metrics(spec, model, data)


def make_teacher(
    ctx: SweepContext, t: TeacherDef, model: nn.Module, data: Splits, device: torch.device
) -> dict[str, float]:
    """What the cache runs when `t` is not there: load its checkpoint, or start from its
    parent's weights (got from the cache, or made, first) and fine-tune, or train from scratch.
    Returns the teacher's metrics."""
    spec = ctx.spec
    if t.checkpoint is not None:
        c = t.checkpoint
        load_checkpoint(model, uri=c.uri, sha256=c.sha256, fmt=c.format, who=t.label)
        print(f"teacher {t.label}: loaded {c.uri} ({c.format}, sha256 {c.sha256[:12]})")
        model.eval()
        return teacher_metrics(spec, model, data)
    if t.init is not None:
        parent, _ = get_teacher(ctx, t.init, data, device)
        model.load_state_dict(parent.state_dict())
        seed_everything(t.seed)  # the parent's training moved the RNG: the fine-tune's own seed
    return train_teacher(spec, t, model, data)


def provenance(spec: SweepSpec, t: TeacherDef) -> dict[str, str]:
    """Where the teacher came from, as its MLflow run's params and tags show it."""
    out = {"source": t.source}
    if t.init is not None:
        h = teacher_hash(teacher_identity(spec, t.init))
        out |= {"finetuned_from": f"{t.init.label}:{h}", "finetuned_from_hash": h}
    if t.checkpoint is not None:
        c = t.checkpoint
        out |= {
            "checkpoint_uri": c.uri,
            "checkpoint_sha256": c.sha256,
            "checkpoint_format": c.format,
        }
    return out


def get_teacher(
    ctx: SweepContext, t: TeacherDef, data: Splits, device: torch.device
) -> tuple[nn.Module, TeacherRecord]:
    """The teacher `t`, from the cache or made now (make_teacher); frozen, in eval mode. A
    fine-tuned teacher's parent is got (recursively) only when the child must be made: under
    the child's lock, then the parent's (always child before parent, so no deadlock)."""
    spec = ctx.spec
    seed_everything(t.seed)  # a teacher depends on its own seed, not the trial's
    model = new_model(t.arch, data, device, fast_path(spec, device))
    identity = teacher_identity(spec, t)
    origin = provenance(spec, t)

    def on_ready(record: TeacherRecord) -> None:
        tracker = ctx.tracker()
        run_id = tracker.ensure_teacher_run(
            record,
            label=t.label,
            params={"label": t.label, "loss": t.loss, **origin, **identity},
            parent_run_id=ctx.parent_run_id,
            sweep=spec.name,
        )
        tracker.set_tags(run_id, origin)

    record = TeacherCache(ctx.layout.teachers).get_or_train(
        identity,
        model,
        lambda m: make_teacher(ctx, t, m, data, device),
        on_ready,
        made="loaded" if t.source == "checkpoint" else "trained",
    )
    return frozen(model), record


def read_checkpoint(uri: str) -> bytes:
    """The whole file at a local path, file:// or any pyarrow URI (s3://, gs://, ...)."""
    where = uri if is_remote(uri) else absolute(uri)
    folder, _, name = where.rstrip("/").rpartition("/")
    blob = Store(folder or "/").read(name)
    if blob is None:
        raise CheckpointError(f"no file at {uri}")
    return blob


def verify_checkpoint(uri: str, sha256: str, who: str) -> None:
    """The file exists and has the pinned sha256: checked by `sweep run` before any trial
    starts (a wrong file is bad input, not a failed trial). Nothing is unpickled."""
    check_sha256(read_checkpoint(uri), sha256, who, uri)


def load_checkpoint(model: nn.Module, *, uri: str, sha256: str, fmt: str, who: str) -> None:
    """Read, verify, map and load a teacher checkpoint into `model` (checkpoint_formats)."""
    load_state(model, read_checkpoint(uri), uri=uri, sha256=sha256, fmt=fmt, who=who)


def frozen(model: nn.Module) -> nn.Module:
    """Eval mode, no parameter requires grad: how teachers are used and runs are analysed."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def get_teachers(
    ctx: SweepContext, defs: list[TeacherDef], data: Splits, device: torch.device
) -> tuple[list[nn.Module], list[TeacherRecord]]:
    pairs = [get_teacher(ctx, t, data, device) for t in defs]
    return [m for m, _ in pairs], [r for _, r in pairs]
