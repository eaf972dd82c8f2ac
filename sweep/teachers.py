"""The teacher cache: trained teachers stored by content hash, trained once, shared by sweeps.

Why a cache keyed by content: every student trial of a cell needs the same teacher; training it
per trial would multiply the sweep's cost. A teacher's identity is a hash of everything that
defines it, so it is trained once per sweep (a file lock serialises trials that start together)
and found again by later sweeps that ask for the same teacher.

The store is a local folder or any pyarrow filesystem URI (`s3://bucket/sweeps/teachers`,
`gs://...`, `file:///...`). Files are read whole and checked against the sha256 in their
metadata before `torch.load(weights_only=True)`: a truncated or corrupted file is retrained,
never unpickled. Teacher losses themselves live in teacher_losses.py.
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

from .store import Store, locked

log = logging.getLogger(__name__)


def teacher_hash(identity: dict[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


@dataclass
class TeacherRecord:
    """What the cache knows about one teacher, and what happened when it was asked for:
    `event` is "trained" (no copy existed), "cached" (a valid copy was loaded) or "retrained"
    (a copy existed but was unusable; `problem` says why)."""

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
    ) -> TeacherRecord:
        """Load the teacher into `model`, training it first if no valid copy exists.

        `on_ready(record)` runs while the lock is held, so per-sweep bookkeeping (one MLflow
        run per teacher) is race-free too."""
        h = teacher_hash(identity)
        with locked(self.store.lock_path(f"{h}.lock")):
            record, problem = self._load(h, model)
            if record is None:
                event = "retrained" if problem else "trained"
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
