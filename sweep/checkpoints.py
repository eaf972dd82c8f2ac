"""Per-trial checkpoints, keyed by what the trial *is* (cell and number), not by Ray's trial id.

Why not Tune's own checkpoints: Tune files them under its trial id, and a trial that the
driver handed out after its last experiment snapshot comes back from `Tuner.restore` under a new
id (or not at all). Keyed by `<cell>/<number>` (the Optuna trial's identity in its cell's study),
the same trial finds its progress and its MLflow run whichever id, worker or machine runs it.

Layout under `<sweep>/trials/<cell>/<number>/` (`TrialConfig.key`; the k-th seed repeat of
that configuration, see `repeats:`, under `<sweep>/trials/<cell>/<number>/repeat-<k>/`):
- `run.json`: the MLflow run id, written as soon as the run exists (before any epoch);
- `state.pt`: the latest epoch's student, optimiser, schedule, method and RNG states, the epoch,
  the run id and that epoch's metrics, replaced atomically every epoch;
- `outcome.json`: how the trial ended when it will not train again: `failed` (with a reason;
  `diverged` is never retried) or `stopped` (by ASHA; tested at the end of the sweep).

Every write is atomic and fsynced (store.py). A file found damaged anyway (a disk fault, a copy
cut short) never ends in a traceback: a damaged `run.json` or `outcome.json` is ignored with a
warning naming it; a damaged `state.pt` raises `DamagedFile` naming it, and the trial restarts
from scratch in the same MLflow run (trial.py).

`<cell>` is `<safe cell key>-<hash of the exact key>` (TrialConfig.config_key), so distinct
cells never share a folder. A sweep made before the hash has `<safe cell key>/` folders: when
such a folder exists and the hashed one does not, it is used (read and written), so it resumes.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import torch

from .files import DamagedFile
from .store import Store

STOPPED = "stopped"
FAILED = "failed"
STATE_KEYS = frozenset({"model", "epoch", "mlflow_run_id"})  # what every state.pt holds
_HASHED = re.compile(r"(.+)-[0-9a-f]{8}")  # a cell folder as TrialConfig.config_key names it


class TrialCheckpoints:
    """The checkpoints of one sweep's trials (a local folder or a pyarrow URI)."""

    def __init__(self, root: str) -> None:
        self.store = Store(root)
        self._cells: dict[str, str] = {}  # cell folder asked -> cell folder on disk

    def _where(self, key: str) -> str:
        """`key`'s folder: the hashed cell folder, or the unhashed one of a
        sweep made before the hash (when it exists and the hashed one does not)."""
        cell, _, rest = key.partition("/")
        if cell not in self._cells:
            old = m.group(1) if (m := _HASHED.fullmatch(cell)) else None
            if old is None or self.store.exists(cell):
                self._cells[cell] = cell
            elif self.store.exists(old):
                self._cells[cell] = old
            else:  # neither yet: the hashed one, decided again once one exists
                return key
        return f"{self._cells[cell]}/{rest}" if rest else self._cells[cell]

    def _json(self, key: str, name: str, field: str, lost: str) -> dict[str, Any] | None:
        """A small JSON file with `field`, or None if missing or damaged (then a warning naming
        it and saying what is `lost`)."""
        raw = self.store.read(self._where(key), name)
        if raw is None:
            return None
        try:
            value = json.loads(raw)
            if isinstance(value, dict) and isinstance(value.get(field), str):
                return value
            problem = f"no {field!r}"
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            problem = str(e)
        print(
            f"warning: {self.store.location(self._where(key), name)} is damaged ({problem}): {lost}",
            flush=True,
        )
        return None

    def run_id(self, key: str) -> str | None:
        got = self._json(
            key,
            "run.json",
            "mlflow_run_id",
            "its MLflow run id is lost; a restarted trial opens a new run",
        )
        return got["mlflow_run_id"] if got else None

    def set_run_id(self, key: str, run_id: str) -> None:
        self.store.write(
            json.dumps({"mlflow_run_id": run_id}).encode(), self._where(key), "run.json"
        )

    def state(self, key: str) -> dict[str, Any] | None:
        """The latest epoch's state, None before the first; DamagedFile if it cannot be read."""
        raw = self.store.read(self._where(key), "state.pt")
        if raw is None:
            return None
        try:
            state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or garbled: the zip reader or unpickler says how
            problem = f"{type(e).__name__}: {str(e)[:200]}"
        else:
            if isinstance(state, dict) and STATE_KEYS <= state.keys():
                return state
            problem = f"not a trial checkpoint (expected {', '.join(sorted(STATE_KEYS))})"
        raise DamagedFile(
            f"{self.store.location(self._where(key), 'state.pt')} is damaged ({problem})"
        )

    def save_state(self, key: str, state: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        self.store.write(buf.getvalue(), self._where(key), "state.pt")

    def outcome(self, key: str) -> dict[str, Any] | None:
        got = self._json(
            key, "outcome.json", "status", "ignored; the trial counts as not ended yet"
        )
        return {"reason": "", **got} if got else None

    def set_outcome(self, key: str, status: str, reason: str = "") -> None:
        self.store.write(
            json.dumps({"status": status, "reason": reason}).encode(),
            self._where(key),
            "outcome.json",
        )
