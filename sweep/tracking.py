"""MLflow, and nothing else imports it: the only door to the tracking store.

Layout (made for the MLflow UI): one experiment per sweep; a parent run for the sweep; one child
run per trial, named `<cell>#<index>`, and one per distinct teacher, named `teacher:<loss>:<hash>`.
Runs are addressed by id through MlflowClient, never through the fluent API's global "active run",
so a reused Ray actor can never log into the previous trial's run. Trial run ids are stored in the
trial's checkpoint so a restored trial continues the same run (Ray's MLflowLoggerCallback would
open a new one; DESIGN §3.7).

Tags mean the same on every kind of run: `kind` (sweep | student | teacher), `sweep` (the sweep's
name), `sweep_id` (the sweep's identity, state.json's: a name reused after its folder was deleted
is another sweep, in the same experiment), `teacher_loss` (a teacher-loss label as it appears in cell keys: the cell's on a student
run, the teacher's own on a teacher run; the registered loss name is the teacher run's param
`loss`), `method`, `train_attack`, `cell`, `config_key`, `optuna_trial`, `repeat` (students);
`create_token` on every run (start_run finds a run it created before a lost answer by it).
Every query of "the runs of this sweep" is `Tracker.sweep_runs`, paged: no cap on the count. A
tracker made for a sweep (`sweep_id`) tags every run it starts with the id and selects by it;
sweeps made before ids existed (no `sweep_id` in state.json) are selected by name, as then.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import requests
import sqlalchemy.exc
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .credentials import mlflow_client_uri, redact
from .patience import patient_methods, patiently

MAX_PARAM_LEN = 6000
PAGE = 1000  # runs per search call; `_search` pages through all of them


def resolve_tracking_uri(uri: str, base: Path | None = None) -> str:
    """Make a relative `sqlite:///x.db` absolute, so Ray workers in other directories agree."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///") :]
        return "sqlite:///" + str(((base or Path.cwd()) / rel).resolve())
    if "://" not in uri:  # a bare path: MLflow 3 refuses file stores, so use SQLite there
        return "sqlite:///" + str(((base or Path.cwd()) / uri).resolve())
    return uri


# The MLflow 3.17 UI opens every experiment on its GenAI pages (traces, token usage) unless the
# browser has chosen "Model training" (its top-left switch, remembered per browser); the
# experiment tag mlflow.experimentKind is ignored. This query selects it (checked in Chromium).
RUNS_PAGE = "#/experiments/{id}/runs?workflowType=machine_learning"


def ui_hint(uri: str, experiment_id: str) -> str:
    """How to see the sweep's runs table in the MLflow UI."""
    page = RUNS_PAGE.format(id=experiment_id)
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000/{page}"
    if uri.startswith("http"):
        return f"{redact(uri).rstrip('/')}/{page}"
    return f"http://127.0.0.1:5000/{page}"


def _flat(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:MAX_PARAM_LEN]


def flatten_params(params: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    _flat("", params, out)
    return out


CREATE_TOKEN = "create_token"  # tag: finds a run whose creation's answer was lost (start_run)


def mlflow_outage(e: BaseException) -> bool:
    """The tracking store is unreachable or down (patience.py waits), not a bad request: the
    client's own retries gave up on a connection ("API request to ... failed with exception"
    or a timeout), a proxy answered 502/503/504, or a SQLite store was locked or missing."""
    if isinstance(e, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return True
    if isinstance(e, sqlalchemy.exc.OperationalError):
        return True
    if isinstance(e, MlflowException):
        msg = str(e)
        if msg.startswith("API request to ") and (
            "failed with exception" in msg or "failed with timeout exception" in msg
        ):
            return True
        if e.get_http_status_code() in (502, 503, 504):
            return True
        return isinstance(e.__cause__, sqlalchemy.exc.OperationalError)  # SQLite store
    return False


def patient_client(uri: str) -> MlflowClient:
    """An MlflowClient whose every call waits out an outage of the store (patience.py)."""
    return patient_methods(MlflowClient(uri), f"MLflow at {redact(uri)}", mlflow_outage)


class Tracker:
    """One MLflow experiment (a sweep) and the runs in it."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        artifact_root: str | None = None,
        *,
        wait_first: bool = True,
        sweep_id: str | None = None,
    ) -> None:
        """`wait_first=False`: a store unreachable at this first contact is an error (a new
        sweep checks its store so); after it, and always with the default, outages are waited
        out (patience.py)."""
        self.uri = tracking_uri = mlflow_client_uri(tracking_uri)  # no password in messages
        patient = patient_client(tracking_uri)
        self.client = patient if wait_first else MlflowClient(tracking_uri)
        self.experiment_id = self._experiment(experiment, artifact_root)
        self.client = patient
        self.sweep_id = sweep_id  # None: a sweep from before ids, selected by its name only

    @classmethod
    def of_state(cls, state: dict[str, Any]) -> Tracker:
        """The tracker of an opened sweep (its state.json), selecting its runs by its id."""
        return cls(
            state["mlflow_tracking_uri"], state["experiment"], sweep_id=state.get("sweep_id")
        )

    @classmethod
    def for_run(cls, tracking_uri: str, run_id: str) -> tuple[Tracker, Any]:
        """The tracker of the sweep that holds `run_id` (its experiment and id), and the run."""
        client = patient_client(mlflow_client_uri(tracking_uri))
        run = client.get_run(run_id)
        name = client.get_experiment(run.info.experiment_id).name
        return cls(tracking_uri, name, sweep_id=run.data.tags.get("sweep_id")), run

    def _experiment(self, name: str, artifact_root: str | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_root)
        except MlflowException:  # another process created it first
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    # --- runs -------------------------------------------------------------------------------
    def start_run(
        self,
        name: str,
        *,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
    ) -> str:
        """A new run; its id. Created once however often the store drops the answer: a
        retry first looks for the run by this call's `create_token` tag."""
        token = uuid.uuid4().hex
        all_tags = {**(tags or {}), CREATE_TOKEN: token}
        if self.sweep_id:
            all_tags["sweep_id"] = self.sweep_id
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        raw = MlflowClient(self.uri)  # retried here as a whole: find, then create
        tries = 0

        def create() -> Any:
            nonlocal tries
            tries += 1
            if tries > 1:  # an earlier try may have reached the store before its answer was lost
                found = raw.search_runs([self.experiment_id], f"tags.{CREATE_TOKEN} = '{token}'")
                if found:
                    return found[0]
            return raw.create_run(self.experiment_id, run_name=name, tags=all_tags)

        run = patiently(create, f"MLflow at {redact(self.uri)}", mlflow_outage)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        flat = flatten_params(params)
        items = [Param(k, v) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):  # MLflow's per-batch limit
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(
        self,
        run_id: str,
        metrics: dict[str, float],
        step: int,
        logged: dict[str, int] | None = None,
    ) -> None:
        """All of an epoch's metrics in one round trip. `logged` (from `logged_steps`): skip a
        metric already logged at this step, so a resumed trial never logs a step twice."""
        ts = int(time.time() * 1000)
        logged = logged or {}
        batch = [
            Metric(k, float(v), ts, step) for k, v in metrics.items() if step > logged.get(k, -1)
        ]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def logged_steps(self, run_id: str) -> dict[str, int]:
        """The last step logged of each metric of the run (one query per metric name)."""
        run = self.client.get_run(run_id)
        return {
            k: max(m.step for m in self.client.get_metric_history(run_id, k))
            for k in run.data.metrics
        }

    def resume_run(self, run_id: str, tags: dict[str, str]) -> str:
        """Continue a run (a trial restarted from its checkpoint): back to RUNNING unless it
        FINISHED or FAILED for good, with `tags` updated. Returns the run's status before."""
        status = self.status(run_id)
        if status in ("RUNNING", "KILLED", "FAILED"):
            self.client.update_run(run_id, status="RUNNING")
        self.set_tags(run_id, tags)
        return status

    def close_running(
        self, sweep: str, status: str, reason: str, *, parent: bool = False
    ) -> list[str]:
        """Set every still-RUNNING student or refit run of `sweep` (this tracker's sweep id: never
        another sweep's) to `status` (KILLED when the sweep was interrupted, so the UI does not
        show runs as live that nothing is running); `parent`: its sweep run too."""
        kinds = ("student", "refit", "sweep") if parent else ("student", "refit")
        runs = [r for kind in kinds for r in self.sweep_runs(sweep, kind, status="RUNNING")]
        for r in runs:
            self.set_tags(r.info.run_id, {"stopped_because": reason})
            self.finish(r.info.run_id, status)
        return [r.info.run_id for r in runs]

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(
        self, run_id: str, files: dict[str, bytes | str | Path], path: str | None = None
    ) -> None:
        """`files` maps artifact names (may hold folders: `history/a.png`) to contents
        (bytes/str) or local paths; `path`: the run's folder to put them in."""
        with tempfile.TemporaryDirectory() as d:
            for name, content in files.items():
                dst = Path(d) / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, Path):
                    dst.write_bytes(content.read_bytes())
                elif isinstance(content, bytes):
                    dst.write_bytes(content)
                else:
                    dst.write_text(content)
            self.client.log_artifacts(run_id, d, artifact_path=path)

    def download_artifact(self, run_id: str, name: str, dst: str | Path) -> Path:
        return Path(self.client.download_artifacts(run_id, name, str(dst)))

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def fail(self, run_id: str, reason: str, detail: str = "") -> None:
        self.set_tags(run_id, {"failure_reason": reason, "failure_detail": detail[:5000]})
        self.finish(run_id, "FAILED")

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def ensure_teacher_run(
        self,
        record: Any,
        *,
        label: str,
        params: dict[str, Any],
        parent_run_id: str | None,
        sweep: str,
    ) -> str:
        """One run per distinct teacher per sweep, however many trials use it; `record` is the
        cache's TeacherRecord. Callers hold the teacher's cache lock, so the search-then-create
        below does not race. A teacher retrained mid-sweep (corrupt cache file) updates its run.
        """
        found = self.sweep_runs(sweep, "teacher", where=f"tags.teacher_hash = '{record.hash}'")
        tags = {"cache_event": record.event, "from_cache": str(not record.trained).lower()}
        if record.problem:
            tags["cache_problem"] = record.problem[:5000]
        if found:
            run_id = found[0].info.run_id
            if record.trained:  # retrained under this sweep: record the event and new metrics
                self.set_tags(run_id, tags)
                self.log_metrics(run_id, record.metrics, step=0)
            return run_id
        run_id = self.start_run(
            f"teacher:{label}:{record.hash[:8]}",
            params=params,
            tags={
                "kind": "teacher",
                "teacher_hash": record.hash,
                "teacher_loss": label,  # as on student runs; the loss's name: param `loss`
                "teacher_label": label,
                "sweep": sweep,
                "cache_location": redact(record.location),
                **tags,
            },
            parent_run_id=parent_run_id,
        )
        self.log_metrics(run_id, record.metrics, step=0)
        self.finish(run_id)
        return run_id

    # --- reading ---------------------------------------------------------------------------
    def _search(self, filter_string: str) -> list[Any]:
        """Every run of the experiment matching `filter_string`, page by page."""
        runs: list[Any] = []
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string, max_results=PAGE, page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def sweep_runs(
        self,
        sweep: str,
        kind: str | None = None,
        *,
        status: str | None = None,
        repeats: bool = False,
        where: str = "",
    ) -> list[Any]:
        """The runs of sweep `sweep` (and of this tracker's sweep id, when it has one): all of
        them, or of one `kind` (sweep, student, teacher), only those in `status`, only seed
        repeats, or matching a further MLflow filter."""
        terms = [f"tags.sweep = '{sweep}'"]
        if self.sweep_id:  # the name alone may be a deleted sweep's too
            terms.append(f"tags.sweep_id = '{self.sweep_id}'")
        if kind:
            terms.append(f"tags.kind = '{kind}'")
        if status:
            terms.append(f"attributes.status = '{status}'")
        if repeats:
            terms.append("tags.repeat LIKE '%'")
        if where:
            terms.append(where)
        return self._search(" and ".join(terms))

    def metrics(self, run_id: str) -> dict[str, float]:
        """The run's metrics, each at its last logged value."""
        return dict(self.client.get_run(run_id).data.metrics)


def default_artifact_root(tracking_uri: str, sweep: str) -> str | None:
    """Next to a SQLite database, artifacts go to `mlartifacts/<sweep>` beside it; servers
    choose their own root. `sweep` is a sweep's name (layout.check_name's rule), never an
    experiment name, which may hold `/` or `..` (`/etc/cron.d` would be a root)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts" / sweep).as_uri()
    return None
