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

from .store import Store

STOPPED = "stopped"
FAILED = "failed"
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

    def run_id(self, key: str) -> str | None:
        raw = self.store.read(self._where(key), "run.json")
        return json.loads(raw)["mlflow_run_id"] if raw else None

    def set_run_id(self, key: str, run_id: str) -> None:
        self.store.write(
            json.dumps({"mlflow_run_id": run_id}).encode(), self._where(key), "run.json"
        )

    def state(self, key: str) -> dict[str, Any] | None:
        raw = self.store.read(self._where(key), "state.pt")
        if raw is None:
            return None
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)

    def save_state(self, key: str, state: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        self.store.write(buf.getvalue(), self._where(key), "state.pt")

    def outcome(self, key: str) -> dict[str, Any] | None:
        raw = self.store.read(self._where(key), "outcome.json")
        return json.loads(raw) if raw else None

    def set_outcome(self, key: str, status: str, reason: str = "") -> None:
        self.store.write(
            json.dumps({"status": status, "reason": reason}).encode(),
            self._where(key),
            "outcome.json",
        )
