"""What one trial *is*: a typed, frozen configuration, a dict only at Tune's boundary.

Why a dataclass: the searcher builds a trial's configuration and the trial, its checkpoints, the
per-cell scheduler and the progress display read it. Read by string key from an untyped dict,
a renamed field breaks silently in one of them; here it breaks at once, in one place.

A trial's identity in its cell is `number`: the Optuna trial's number in the cell's study. It
names the trial's checkpoint folder and MLflow run, and sets its seed (sweep seed + number), so
cells share seeds trial for trial (paired comparisons). Seed repeats of a cell's best
configuration keep its number and add `repeat` = 1..N with a new seed. A refit of a cell's best
configuration (spec.refit) keeps its number and seed and sets `refit`: it trains on train +
validation for the final numbers.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .spec import Cell


def cell_folder(cell: str) -> str:
    """The folder of a cell's trials (TrialConfig.config_key): the key made safe for any
    filesystem, then a short hash of the exact key, so distinct keys never share a folder."""
    digest = hashlib.sha256(cell.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._=,-]', '_', cell)}-{digest}"


@dataclass(frozen=True)
class TrialConfig:
    cell: str  # the cell's key: `<teacher_loss>.<method>.<train_attack>`
    teacher_loss: str
    method: str
    train_attack: str
    hp: dict[str, Any] = field(default_factory=dict)  # every resolved hyperparameter
    seed: int = 0
    number: int = 0  # the Optuna trial's number in the cell's study
    repeat: int = 0  # k-th seed repeat of the configuration; 0 for the tuned trial
    trial_id: str = ""  # Tune's id of the trial running it now (changes on restore)
    refit: bool = False  # retrained on train + validation after tuning (refit.py)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialConfig:
        """The config Tune hands a trainable or a callback."""
        return cls(
            cell=str(d["cell"]),
            teacher_loss=str(d["teacher_loss"]),
            method=str(d["method"]),
            train_attack=str(d["train_attack"]),
            hp=dict(d.get("hp") or {}),
            seed=int(d["seed"]),
            number=int(d["number"] if "number" in d else d["cell_index"]),  # before 0.1.1
            repeat=int(d.get("repeat") or 0),
            trial_id=str(d.get("trial_id") or ""),
            refit=bool(d.get("refit") or False),
        )

    def to_dict(self) -> dict[str, Any]:
        """What the searcher gives Tune (plain values: Tune stores and shows it)."""
        return asdict(self)

    @property
    def grid_cell(self) -> Cell:
        return Cell(self.teacher_loss, self.method, self.train_attack)

    @property
    def config_key(self) -> str:
        """`<cell>-<hash>/<number>`: the configuration (a tuned trial and its seed repeats share
        it). The cell key made safe for any filesystem, and, since that is not one-to-one
        (`mcmi(lambda=0.1)`, `mcmi_lambda=0.1_`; `CE`, `ce` on a case-insensitive disk), a
        short hash of the exact key (checkpoints.py reads a sweep named before it)."""
        return f"{cell_folder(self.cell)}/{self.number}"

    @property
    def key(self) -> str:
        """Where this trial's checkpoints live: its configuration's folder, and for the k-th
        seed repeat a `repeat-k` folder inside it."""
        if self.refit:
            return self.config_key + "/refit"
        return self.config_key + (f"/repeat-{self.repeat}" if self.repeat else "")

    @property
    def label(self) -> str:
        """The readable name (the MLflow run name): `<cell>#<number>`, `.r<k>` for a repeat,
        `.refit` for a refit."""
        if self.refit:
            return f"{self.cell}#{self.number}.refit"
        return f"{self.cell}#{self.number}" + (f".r{self.repeat}" if self.repeat else "")
