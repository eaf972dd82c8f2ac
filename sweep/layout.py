"""Where every file of a sweep lives, local folder or URI: one object, asked by everyone.

Why one object: the sweep's folder, the teacher cache, the Optuna storage, Tune's experiment,
the trials' checkpoints, AutoAttack's progress files and the report folder were each computed
where they were needed, and a sweep on `s3://` turned into a local `s3:/...` folder in one of
them. Each location is decided here once.

    <storage.path>/<name>/           the sweep (a local folder or a URI)
        sweep.yaml, state.json       the resolved file; MLflow and Optuna locations
        optuna.db                    default Optuna storage (a local sweep only)
        tune/                        Ray Tune's experiment
        trials/<cell>/<n>/...        each trial's checkpoints (checkpoints.py)
        autoattack/<run id>/         AutoAttack progress of a trial's test (local sweep)
        autoattack-final/<run id>/   ... of `sweep evaluate` (local sweep)
        report/                      `sweep report` (local sweep)
    <storage.path>/teachers/         the teacher cache, unless storage.teachers names one

A sweep on an object store keeps AutoAttack's progress in this machine's cache (it runs here)
and writes its report to `./<name>-report`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .credentials import real_url, redact
from .files import DamagedFile
from .spec import NAME_RE, SpecError, SweepSpec, parse_spec
from .store import Store, absolute, is_remote, join

CACHE = Path.home() / ".cache" / "kdsweep"


@dataclass(frozen=True)
class SweepLayout:
    root: str  # the storage root (storage.path), absolute or a URI
    name: str
    teachers: str  # the teacher cache
    optuna_url: str

    @classmethod
    def of(cls, spec: SweepSpec) -> SweepLayout:
        """The layout a sweep file asks for."""
        root = absolute(spec.storage.path)
        sweep = join(root, spec.name)
        t = spec.storage.teachers
        # a URI storage.path comes with storage.optuna (spec validation): SQLite needs a file
        return cls(
            root=root,
            name=spec.name,
            teachers=absolute(t) if t else join(root, "teachers"),
            optuna_url=spec.storage.optuna or f"sqlite:///{sweep}/optuna.db",
        )

    @property
    def sweep(self) -> str:
        return join(self.root, self.name)

    @property
    def remote(self) -> bool:
        return is_remote(self.sweep)

    def store(self) -> Store:
        return Store(self.sweep)

    @property
    def tune(self) -> str:
        return f"{self.sweep}/tune"

    @property
    def trials(self) -> str:
        return f"{self.sweep}/trials"

    def study_name(self, cell_key: str) -> str:
        """The Optuna study of one grid cell (all cells' studies share one storage)."""
        return study_name(self.name, cell_key)

    def _local(self, folder: str) -> Path:
        """A folder of this sweep that must be on this machine's disk."""
        if not self.remote:
            return Path(self.sweep) / folder
        tag = hashlib.sha256(self.sweep.encode()).hexdigest()[:12]
        return CACHE / folder / f"{self.name}-{tag}"

    def autoattack_state(self, run_id: str) -> Path:
        """AutoAttack's resumable progress for the test of one trial."""
        return self._local("autoattack") / run_id

    @property
    def final_autoattack_state(self) -> Path:
        """... and for `sweep evaluate` (one folder per run inside)."""
        return self._local("autoattack-final")

    @property
    def report(self) -> Path:
        """Where `sweep report` writes (plots are drawn locally, then logged to MLflow)."""
        if self.remote:
            return Path(f"{self.name}-report").resolve()
        return Path(self.sweep) / "report"


REPORT_MARK = "summary.md"  # every report folder holds one (report/__init__.py)


def report_out(out: str | Path) -> Path:
    """A `--out` folder for `sweep report`: new, empty, or a previous report (it holds
    REPORT_MARK), whose files are replaced. Any other folder is refused (SpecError), so fixed
    names (summary.md, trials.csv, history/...) never overwrite someone else's files."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SpecError("--out", [("", f"{path} is a file; give a folder")])
    if path.is_dir() and any(path.iterdir()) and not (path / REPORT_MARK).is_file():
        raise SpecError(
            "--out",
            [
                (
                    "",
                    f"{path} holds files and no {REPORT_MARK}: not a previous report, so it is "
                    "not written into; give a new or empty folder, or a report's folder",
                )
            ],
        )
    return path


def study_name(sweep: str, cell_key: str) -> str:
    """The Optuna study of one grid cell of sweep `sweep`."""
    return f"{sweep}/{cell_key}"


STATE_KEYS = (
    "mlflow_tracking_uri",
    "experiment",
    "parent_run_id",
    "optuna",
)  # what its readers use


def _state(raw: bytes, where: str) -> dict[str, Any]:
    """state.json's contents; DamagedFile naming it (and what it must hold) if it is not whole."""
    try:
        state = json.loads(raw)
        missing = [k for k in STATE_KEYS if not isinstance(state.get(k), str)]
        problem = f"no {', '.join(missing)}" if missing else ""
    except (ValueError, AttributeError) as e:  # not JSON, not UTF-8, not an object
        problem = str(e)[:200]
    if problem:
        raise DamagedFile(
            f"{where} is damaged ({problem}): it records where the sweep's MLflow runs and "
            f"Optuna trials are; restore it from a copy, or write it again as a JSON object "
            f"with {', '.join(STATE_KEYS)}"
        )
    return state


@dataclass(frozen=True)
class OpenedSweep:
    """A started sweep: where it is, its state.json (MLflow, Optuna) and its resolved spec."""

    layout: SweepLayout
    state: dict[str, Any]
    spec: SweepSpec


def check_name(name: str) -> str:
    """`name` if it is a sweep name (spec.NAME_RE, the rule of the file's `name:`), else
    SpecError: a name becomes a folder, so `../x`, `/etc`, `a/b`, NUL... never reach a path."""
    if not isinstance(name, str) or not re.fullmatch(NAME_RE.strip("^$"), name):
        raise SpecError(
            "sweep name",
            [
                (
                    "",
                    f"{name!r} is not a sweep name; allowed: a letter or digit, then letters, "
                    "digits, '_', '.', '-' (no path separators)",
                )
            ],
        )
    return name


STATE_URLS = {"optuna": "optuna", "mlflow_tracking_uri": "mlflow_tracking_uri"}  # key: field


def write_state(store: Store, state: dict[str, Any]) -> None:
    """A sweep's state.json, its URLs without passwords (open_sweep gets them back)."""
    saved = {k: redact(v) if k in STATE_URLS else v for k, v in state.items()}
    store.write(json.dumps(saved, indent=2).encode(), "state.json")


def open_sweep(name: str, storage: str | Path = "./sweeps") -> OpenedSweep:
    """The sweep `name` under `storage`; FileNotFoundError if there is none.

    The stored URLs have no passwords (credentials.py); the state returned holds the ones to
    connect with (from the environment again)."""
    store = Store(join(storage, check_name(name)))
    raw = store.read("state.json")
    if raw is None:
        raise FileNotFoundError(f"no sweep {name!r} under {absolute(storage)} (give --storage)")
    state = _state(raw, store.location("state.json"))
    for key, field in STATE_URLS.items():
        state[key] = real_url(state[key], field)
    text = store.read("sweep.yaml") or b""
    try:
        loaded = yaml.safe_load(text.decode())
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise DamagedFile(
            f"{store.location('sweep.yaml')} is damaged ({str(e)[:200]}): it is the sweep's "
            "resolved file; restore it from a copy, or from a run's sweep.yaml artifact in MLflow"
        ) from None
    spec = parse_spec(loaded, store.location("sweep.yaml"))
    layout = SweepLayout.of(spec)
    # the folder it was found in wins over the file's storage.path (moved, or a relative path
    # resolved from another directory); Optuna is where the sweep recorded it
    layout = SweepLayout(absolute(storage), name, layout.teachers, state["optuna"])
    return OpenedSweep(layout, state, spec)
