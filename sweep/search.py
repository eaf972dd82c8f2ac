"""The search inside each grid cell, behind Ray Tune's plug-in interfaces.

Why not Ray's OptunaSearch directly: it refuses grid_search axes, and one study over all cells
would let a strong cell starve the others of trials. `CellSearcher` hands out suggestions
round-robin over cells that still lack trials, asks each cell's own study (ask/tell, all studies
in one Optuna storage), and returns FINISHED when every cell has its budget. `CellASHA` applies
successive halving within a cell only: comparing an ARD trial with a KD trial would stop whole
cells, and the table must be filled. Each study's sampler (sized to the cell's budget, paired
across the teacher axis) is samplers.py's; a cell past its random phase is offered its sibling
cells' bests (warm start, `_offer_sibling_best`).

Only public Optuna APIs: a trial is addressed by its number in the cell's study, and the
storage's own (public, BaseStorage) methods map it to the storage's trial id.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import optuna
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from . import selection
from .checkpoints import FAILED, TrialCheckpoints
from .config import TrialConfig
from .credentials import redact, redact_spec
from .layout import SweepLayout
from .patience import optuna_storage
from .progress import REPLACES, current_trials
from .samplers import make_sampler, startup
from .space import (
    CategoricalParam,
    FloatParam,
    IntParam,
    LogFloatParam,
    SearchParam,
    is_searched,
)
from .spec import Cell, SweepSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)
STATE_VERSION = 1  # of the JSON searcher and scheduler state (save/restore)
ASHA_SCORE = "asha/score"  # several objectives: the weighted sum CellASHA ranks trials by


def distribution(p: SearchParam) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution of a search-space range of the sweep file."""
    d = optuna.distributions
    if isinstance(p, FloatParam):
        return d.FloatDistribution(p.low, p.high)
    if isinstance(p, LogFloatParam):
        return d.FloatDistribution(p.low, p.high, log=True)
    if isinstance(p, IntParam):
        return d.IntDistribution(p.low, p.high, log=p.log)
    if isinstance(p, CategoricalParam):
        return d.CategoricalDistribution(p.choices)
    raise TypeError(f"not a search-space range: {p!r}")


class CellSearcher(Searcher):
    """One Optuna study per grid cell behind Tune's Searcher interface."""

    def __init__(self, spec: SweepSpec, optuna_url: str) -> None:
        super().__init__(metric=spec.objectives[0].metric, mode=spec.objectives[0].mode)
        self.spec = spec
        self.layout = SweepLayout.of(spec)
        self.optuna_url = optuna_url
        self.cells = spec.cells()
        self.handed: dict[str, list[int]] = {c.key: [] for c in self.cells}  # Optuna numbers
        self.live: dict[str, tuple[str, int]] = {}  # tune id -> (cell, Optuna number)
        self.next_cell = 0
        self.orphans: list[tuple[str, int]] = []  # (cell, optuna number) to hand out again
        self.repeats: dict[str, int] = {c.key: 0 for c in self.cells}  # repeats handed out
        self.no_best: set[str] = set()  # cells whose tuning ended without a finished trial
        # Optuna numbers of each cell's trials that ended: in memory, since Tune asks for a
        # suggestion every loop step while repeats wait for a cell (no database query there)
        self.ended: dict[str, set[int]] = {c.key: set() for c in self.cells}
        self._reconciled = True
        self._studies: dict[str, optuna.Study] = {}
        self._storage: optuna.storages.RDBStorage | None = None
        self._trial_ids: dict[tuple[str, int], int] = {}  # (cell, number) -> storage's id

    def __getstate__(self) -> dict[str, Any]:  # Optuna studies hold DB engines: not picklable
        state = dict(self.__dict__)
        state["_studies"] = {}
        state["_storage"] = None
        state["_trial_ids"] = {}
        # Tune pickles its searcher into the sweep's folder (tune/tuner.pkl): no password
        # there; the resuming driver sets the URL to connect with (driver.resume_sweep)
        state["optuna_url"] = redact(self.optuna_url)
        state["spec"] = redact_spec(self.spec)
        state["layout"] = replace(self.layout, optuna_url=redact(self.layout.optuna_url))
        return state

    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict, **spec: Any
    ) -> bool:
        return True

    @property
    def storage(self) -> optuna.storages.RDBStorage:
        if self._storage is None:
            # one storage (one connection pool) for every cell's study; outages are waited out
            self._storage = optuna_storage(self.optuna_url)
        return self._storage

    def study(self, key: str) -> optuna.Study:
        if key not in self._studies:
            position = [c.key for c in self.cells].index(key)
            cell = self.cells[position]
            self._studies[key] = optuna.create_study(
                study_name=self.layout.study_name(key),
                storage=self.storage,
                directions=[
                    ("maximize" if o.mode == "max" else "minimize") for o in self.spec.objectives
                ],
                sampler=make_sampler(self.spec, cell, position),
                load_if_exists=True,
            )
            self._start_with_paper(self._studies[key], key)
        return self._studies[key]

    def _start_with_paper(self, study: optuna.Study, key: str) -> None:
        """A new cell's first trial is its method's paper setting (spec.paper_start); tuning
        starts from the second. Enqueued once, when the study is still empty: a resumed sweep
        finds the trial asked or still waiting in the storage."""
        method = next(c.method for c in self.cells if c.key == key)
        params, _ = self.spec.paper_start(method)
        if params and not study.get_trials(deepcopy=False):
            study.enqueue_trial(params, user_attrs={"paper_default": True})

    def _storage_id(self, key: str, number: int) -> int:
        """The storage's id of trial `number` of the cell's study: asked once per trial (it
        never changes), since Tune reports every epoch of every trial."""
        if (key, number) not in self._trial_ids:
            study_id = self.storage.get_study_id_from_name(self.study(key).study_name)
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, number)
            self._trial_ids[(key, number)] = trial_id
        return self._trial_ids[(key, number)]

    def reconcile(self) -> list[tuple[str, int]]:
        """After a restore: find the Optuna trials this searcher's snapshot never handed to
        Tune (asked after the driver's last snapshot, then the driver died). They are handed
        out again with the same parameters and number, so the trial finds its checkpoint and
        MLflow run: nothing is asked twice and no Optuna trial is left RUNNING."""
        found = []
        for cell in self.cells:
            handed = set(self.handed[cell.key])
            for t in current_trials(self.study(cell.key).get_trials(deepcopy=False)):
                if t.state.is_finished():  # also those told after the snapshot
                    self.ended[cell.key].add(t.number)
                if t.state == optuna.trial.TrialState.WAITING:
                    continue  # enqueued, never asked: the next ask() takes it
                if t.number not in handed:
                    found.append((t.datetime_start, cell.key, t.number))
        self.orphans += [(key, number) for _, key, number in sorted(found)]  # as first asked
        # Tune restarts the trials it knew running or errored (resume_errored), and orphans are
        # handed out again: a FAIL one among them has not ended, whatever Optuna says, until it
        # ends again
        for key, number in [*self.live.values(), *self.orphans]:
            if self.storage.get_trial(self._storage_id(key, number)).state.name == "FAIL":
                self.ended[key].discard(number)
        self._reconciled = True
        return list(self.orphans)

    def suggest(self, trial_id: str) -> dict | str | None:
        if not self._reconciled:
            self.reconcile()
        if self.orphans:
            key, number = self.orphans.pop(0)
            (ot,) = [t for t in self.study(key).get_trials(deepcopy=False) if t.number == number]
            cell = next(c for c in self.cells if c.key == key)
            return self._handout(trial_id, cell, number, ot.params)
        n = len(self.cells)
        budget = self.spec.budget.trials_per_cell
        for i in range(n):
            cell = self.cells[(self.next_cell + i) % n]
            if len(self.handed[cell.key]) < budget:
                self.next_cell = (self.next_cell + i + 1) % n
                space = self.spec.cell_space(cell.method)
                dists = {k: distribution(v) for k, v in space.items() if is_searched(v)}
                self._offer_sibling_best(cell)
                ot = self.study(cell.key).ask(dists)
                return self._handout(trial_id, cell, ot.number, ot.params)
        return self._suggest_repeat(trial_id)

    def _offer_sibling_best(self, cell: Cell) -> None:
        """Warm start (`optuna.warm_start`): once a cell is past its random phase, enqueue the
        best configuration of a sibling cell (same method and attack, another teacher) that
        the cell has not run, one at a time and each sibling best once, for at most half of
        the cell's modelled trials. The enqueued trial records where it came from (user attr
        `warm_start_from`), which also keeps a resumed sweep from offering it again."""
        if not self.spec.optuna.warm_start:
            return
        budget = self.spec.budget.trials_per_cell
        first = startup(self.spec)
        if len(self.handed[cell.key]) < first:
            return
        study = self.study(cell.key)
        trials = current_trials(study.get_trials(deepcopy=False))
        if any(t.state == optuna.trial.TrialState.WAITING for t in trials):
            return  # an offer still waits to be asked
        offered = {t.user_attrs.get("warm_start_from") for t in trials} - {None}
        if len(offered) >= max(1, (budget - first) // 2):
            return
        ran = [t.params for t in trials]
        for sib in self.cells:
            if sib.key == cell.key or (sib.method, sib.train_attack) != (
                cell.method,
                cell.train_attack,
            ):
                continue
            best = self.best_trial(sib.key)
            if best is None:
                continue
            source = f"{sib.key}#{best.number}"
            if source in offered or best.params in ran:
                continue
            study.enqueue_trial(best.params, user_attrs={"warm_start_from": source})
            return

    def _suggest_repeat(self, trial_id: str) -> dict | str | None:
        """Seed repeats of each cell's best configuration, once that cell's tuning has ended
        (its best is final then). None while some cell still tunes: Tune asks again later."""
        waiting = False
        for cell in self.cells:
            if self.repeats[cell.key] >= self.spec.repeats or cell.key in self.no_best:
                continue
            if not self._tuning_ended(cell.key):
                waiting = True
                continue
            best = self.best_trial(cell.key)
            if best is None:
                self.no_best.add(cell.key)
                continue
            self.repeats[cell.key] += 1
            k = self.repeats[cell.key]
            config = self._config(cell, best.number, best.params, trial_id)
            return replace(config, seed=self.spec.repeat_seed(k), repeat=k).to_dict()
        return None if waiting else Searcher.FINISHED

    def _tuning_ended(self, key: str) -> bool:
        handed = self.handed[key]
        return len(handed) >= self.spec.budget.trials_per_cell and set(handed) <= self.ended[key]

    def best_trial(self, key: str) -> optuna.trial.FrozenTrial | None:
        """The cell's best finished trial, by the sweep's one rule (selection.py)."""
        obj = selection.rule(self.spec)
        trials = current_trials(self.study(key).get_trials(deepcopy=False))
        best = selection.best(selection.from_optuna(trials, obj, self.spec.budget.epochs), obj)
        return best.first.ref if best else None

    def refit_config(self, cell: Cell) -> TrialConfig | None:
        """The refit of the cell's best configuration (spec.refit): its number, seed and
        hyperparameters, trained on train + validation. None if no trial finished."""
        best = self.best_trial(cell.key)
        if best is None:
            return None
        return replace(self._config(cell, best.number, best.params, ""), refit=True)

    def _config(
        self, cell: Cell, number: int, params: dict[str, Any], trial_id: str
    ) -> TrialConfig:
        space = self.spec.cell_space(cell.method)
        return TrialConfig(
            cell=cell.key,
            teacher_loss=cell.teacher_loss,
            method=cell.method,
            train_attack=cell.train_attack,
            hp={k: v for k, v in space.items() if not is_searched(v)} | params,
            seed=self.spec.seed + number,
            number=number,
            trial_id=trial_id,
        )

    def _handout(
        self, trial_id: str, cell: Cell, number: int, params: dict[str, Any]
    ) -> dict[str, Any]:
        """The trial config. Its identity in the cell (checkpoints, MLflow run, seed) is the
        Optuna trial's number in the cell's study."""
        self.handed[cell.key].append(number)
        self.live[trial_id] = (cell.key, number)
        return self._config(cell, number, params, trial_id).to_dict()

    def _finished(self, key: str, number: int) -> bool:
        return self.storage.get_trial(self._storage_id(key, number)).state.is_finished()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.live or len(self.spec.objectives) > 1:
            return
        key, number = self.live[trial_id]
        metric = self.spec.objectives[0].metric
        if metric in result and "epoch" in result and not self._finished(key, number):
            self.storage.set_trial_intermediate_value(
                self._storage_id(key, number), int(result["epoch"]), float(result[metric])
            )

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if trial_id not in self.live:
            return
        # an errored trial stays known: `sweep resume` (resume_errored) may continue it
        key, number = self.live[trial_id] if error else self.live.pop(trial_id)
        self.ended[key].add(number)
        study = self.study(key)
        state = optuna.trial.TrialState
        objectives = self.spec.objectives
        # skip_if_finished: told before the driver died; Optuna keeps its verdict
        if error or not result or any(o.metric not in result for o in objectives):
            self._record_failure(key, number)
            study.tell(number, state=state.FAIL, skip_if_finished=True)
            return
        values = [float(result[o.metric]) for o in objectives]
        epoch = int(result.get("epoch", 0))
        if self._failed_before(key, number):
            self._replace_failed(key, number, values, epoch)
            return
        if epoch < self.spec.budget.epochs and len(objectives) == 1:
            # stopped early by ASHA: TPE ranks PRUNED trials by their intermediate values
            study.tell(number, state=state.PRUNED, skip_if_finished=True)
            return
        # with several objectives Optuna has no intermediate values, and its samplers skip
        # PRUNED trials: a stopped trial is told its values at the epoch it stopped, marked
        # so that selection never counts it as a full-budget trial
        if not self._finished(key, number):
            self.storage.set_trial_user_attr(self._storage_id(key, number), "epochs_trained", epoch)
        study.tell(number, values, skip_if_finished=True)

    def _record_failure(self, key: str, number: int) -> None:
        """A trial that failed for good with a reason (diverged, timeout) says it in Optuna
        too (user attr `failure_reason`), as its MLflow run does."""
        config = TrialConfig(key, "", "", "", {}, 0, number)  # its checkpoint key only
        outcome = TrialCheckpoints(self.layout.trials).outcome(config.key)
        if outcome and outcome["status"] == FAILED and not self._finished(key, number):
            trial_id = self._storage_id(key, number)
            self.storage.set_trial_user_attr(trial_id, "failure_reason", outcome["reason"])

    def _failed_before(self, key: str, number: int) -> bool:
        """Optuna was told this trial FAILed (its retries were spent, or `sweep status --fix`
        closed it), and now it came back and finished: `sweep resume` continued it."""
        state = self.storage.get_trial(self._storage_id(key, number)).state
        return state == optuna.trial.TrialState.FAIL

    def _replace_failed(self, key: str, number: int, values: list[float], epoch: int) -> None:
        """A FAIL trial is final in Optuna: its outcome goes in as a new trial with the same
        parameters and distributions, user attr `replaces` naming the failed one, which
        progress.current_trials shows in its place (status, report, selection, this searcher).
        Once: a driver that died after adding it finds it on resume."""
        study = self.study(key)
        if any(t.user_attrs.get(REPLACES) == number for t in study.get_trials(deepcopy=False)):
            return
        old = self.storage.get_trial(self._storage_id(key, number))
        attrs = {k: v for k, v in old.user_attrs.items() if k != "closed_because"}
        attrs[REPLACES] = number
        one = len(self.spec.objectives) == 1
        steps = dict(old.intermediate_values)
        if one:
            steps[epoch] = values[0]
        pruned = epoch < self.spec.budget.epochs and one  # as `on_trial_complete` tells
        if not pruned:
            attrs["epochs_trained"] = epoch
        study.add_trial(
            optuna.trial.create_trial(
                state=optuna.trial.TrialState.PRUNED
                if pruned
                else optuna.trial.TrialState.COMPLETE,
                values=None if pruned else values,
                params=old.params,
                distributions=old.distributions,
                user_attrs=attrs,
                intermediate_values=steps,
            )
        )

    def save(self, checkpoint_path: str) -> None:
        """What the searcher knows beyond Optuna's storage, as JSON data (never a pickle: the
        driver must not run code from a file others may write; restore refuses one)."""
        state = {
            "handed": self.handed,
            "live": {tid: list(v) for tid, v in self.live.items()},
            "next_cell": self.next_cell,
            "orphans": [list(o) for o in self.orphans],
            "repeats": self.repeats,
            "no_best": sorted(self.no_best),
            "ended": {k: sorted(v) for k, v in self.ended.items()},
        }
        write_state(checkpoint_path, "searcher", state)

    def restore(self, checkpoint_path: str) -> None:
        s = read_state(checkpoint_path, "searcher")
        self.handed = {k: [int(n) for n in v] for k, v in s["handed"].items()}
        self.live = {tid: (str(c), int(n)) for tid, (c, n) in s["live"].items()}
        self.next_cell = int(s["next_cell"])
        self.orphans = [(str(c), int(n)) for c, n in s["orphans"]]
        self.repeats = {k: int(v) for k, v in s["repeats"].items()}
        self.no_best = set(s["no_best"])
        self.ended = {k: {int(n) for n in v} for k, v in s["ended"].items()}
        self._reconciled = False  # the storage may know trials the snapshot does not


class CellASHA(FIFOScheduler):
    """Asynchronous successive halving (Li et al. 2020) run separately inside each cell.
    Seed repeats run their whole budget: never stopped, never seen by ASHA."""

    def __init__(self, spec: SweepSpec) -> None:
        super().__init__()
        b, o = spec.budget, spec.objectives[0]
        # several objectives: ASHA ranks by the declared weighted sum (spec: required then)
        self._weights: dict[str, float] | None = None
        if len(spec.objectives) > 1:
            mode = {x.metric: x.mode for x in spec.objectives}
            w = b.asha_weights or {}
            self._weights = {m: (v if mode[m] == "max" else -v) for m, v in w.items()}
        self._kw = dict(
            time_attr="epoch",  # not Tune's iteration count, which restarts on restore
            metric=ASHA_SCORE if self._weights is not None else o.metric,
            mode="max" if self._weights is not None else o.mode,
            max_t=b.epochs,
            grace_period=b.grace_period,
            reduction_factor=b.reduction_factor,
        )
        self._per_cell: dict[str, AsyncHyperBandScheduler] = {}
        self._added: dict[str, set[str]] = {}  # cell -> Tune ids its ASHA knows

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True

    def scored(self, result: dict) -> dict:
        """The result with the score ASHA ranks by when there are several objectives."""
        w = self.__dict__.get("_weights")
        if not w or not all(m in result for m in w):
            return result
        return {**result, ASHA_SCORE: sum(v * float(result[m]) for m, v in w.items())}

    def _asha(self, trial: Any) -> tuple[AsyncHyperBandScheduler, set[str]] | None:
        """The trial's cell's ASHA and the trials it knows; None for a seed repeat."""
        config = TrialConfig.from_dict(trial.config)
        if config.repeat:
            return None
        if config.cell not in self._per_cell:
            self._per_cell[config.cell] = AsyncHyperBandScheduler(**self._kw)
            self._added[config.cell] = set()
        return self._per_cell[config.cell], self._added[config.cell]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if found := self._asha(trial):
            found[0].on_trial_add(tune_controller, trial)
            found[1].add(trial.trial_id)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if found := self._asha(trial):
            return found[0].on_trial_result(tune_controller, trial, self.scored(result))
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if found := self._asha(trial):
            result = self.scored(result)
            found[0].on_trial_complete(tune_controller, trial, result)
            if {"epoch", self._kw["metric"]} <= set(result):  # as ASHA forgets the trial
                found[1].discard(trial.trial_id)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        found = self._asha(trial)
        if found and trial.trial_id in found[1]:
            found[0].on_trial_remove(tune_controller, trial)
            found[1].discard(trial.trial_id)

    def save(self, checkpoint_path: str) -> None:
        """Each cell's ASHA as JSON data: the rewards recorded at each rung of each bracket,
        which bracket each trial is in, and how many it stopped (the rest follows from the
        spec, as in __init__)."""
        cells = {}
        for cell, asha in self._per_cell.items():
            brackets = asha._brackets
            cells[cell] = {
                "rungs": [
                    [{tid: float(r) for tid, r in recorded.items()} for _, recorded in b._rungs]
                    for b in brackets
                ],
                "trials": {tid: brackets.index(b) for tid, b in asha._trial_info.items()},
                "stopped": asha._num_stopped,
                "added": sorted(self._added.get(cell, ())),
            }
        write_state(checkpoint_path, "scheduler", {"cells": cells})

    def restore(self, checkpoint_path: str) -> None:
        s = read_state(checkpoint_path, "scheduler")
        self._per_cell, self._added = {}, {}
        for cell, c in s["cells"].items():
            asha = AsyncHyperBandScheduler(**self._kw)
            for b, rungs in zip(asha._brackets, c["rungs"], strict=True):
                for (_, recorded), saved in zip(b._rungs, rungs, strict=True):
                    recorded.update({tid: float(r) for tid, r in saved.items()})
            asha._trial_info = {tid: asha._brackets[int(i)] for tid, i in c["trials"].items()}
            asha._num_stopped = int(c["stopped"])
            self._per_cell[cell] = asha
            self._added[cell] = set(c["added"])


class StateRefused(ValueError):
    """A searcher or scheduler state file that is not kdsweep's JSON (e.g. a pickle)."""


def write_state(path: str, kind: str, state: dict[str, Any]) -> None:
    """`state` as JSON, tagged with its kind (Tune names the file `*.pkl`; it holds JSON)."""
    with open(path, "w") as f:
        json.dump({"kdsweep": kind, "version": STATE_VERSION, "state": state}, f)


def read_state(path: str, kind: str) -> dict[str, Any]:
    """The state `write_state` wrote; StateRefused for anything else, which is never run
    through pickle (a sweep saved by a kdsweep before JSON state cannot be resumed)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        doc = None
    if not (isinstance(doc, dict) and doc.get("kdsweep") == kind):
        raise StateRefused(
            f"{path}: not kdsweep's JSON {kind} state (a pickle, or another file); refused "
            "without loading it. A sweep saved by an older kdsweep cannot be resumed"
        )
    if doc.get("version") != STATE_VERSION:
        raise StateRefused(
            f"{path}: {kind} state version {doc.get('version')!r}, not {STATE_VERSION}"
        )
    return doc["state"]
