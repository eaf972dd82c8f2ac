"""Issue 19, security: a torch without CVE-2025-32434 (item 2); no password from a storage URL
in anything kdsweep writes or prints (item 3); searcher and scheduler state kept as JSON, a
pickle refused unloaded (item 4); names never become paths (item 5); distinct cells never
share a checkpoint folder (item 10). Cluster manifests (item 6): test_cluster_configs.py."""

from __future__ import annotations

import json
import pickle
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import tiny_spec_dict, trial_config
from packaging.requirements import Requirement
from packaging.version import Version

from sweep import cli
from sweep.checkpoints import TrialCheckpoints
from sweep.layout import SweepLayout, open_sweep
from sweep.search import CellASHA, CellSearcher
from sweep.spec import SpecError, dump_spec, parse_spec
from sweep.store import Store

REPO = Path(__file__).resolve().parents[1]
SECRET, QSECRET = "S3cr3t-pw", "Q5ecret"  # as written in URLs; neither may leak
OPTUNA = f"postgresql+psycopg2://kd:{SECRET}@127.0.0.1:1/optuna?sslmode=disable"
MLFLOW = f"http://kd:{SECRET}@127.0.0.1:1"
QUERY = f"postgresql://kd@127.0.0.1:1/optuna?password={QSECRET}&sslmode=disable"


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> Path:
    """One SQLite MLflow store for the tests here (creating one takes seconds)."""
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


def _masked(url: str) -> str:
    return url.replace(SECRET, "***").replace(QSECRET, "***")


def _leaks(text: str | bytes) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return [s for s in (SECRET, QSECRET) if s in text]


# --- item 2 -------------------------------------------------------------------------------------
def test_torch_requirement_excludes_cve_2025_32434():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = {r.name: r for r in map(Requirement, deps)}
    torch_req, vision = reqs["torch"].specifier, reqs["torchvision"].specifier
    assert not torch_req.contains("2.5.1") and torch_req.contains("2.6.0")
    assert "==2.13.0" not in str(torch_req)  # README, "Installing"
    assert not vision.contains("0.20.1") and vision.contains("0.21.0")
    assert Version(torch.__version__.split("+")[0]) >= Version("2.6")


# --- item 3 -------------------------------------------------------------------------------------
def _spec(tmp_path, optuna=OPTUNA, mlflow=MLFLOW):
    d = tiny_spec_dict(tmp_path)
    d["storage"] |= {"optuna": optuna, "mlflow_tracking_uri": mlflow}
    return parse_spec(d)


@pytest.mark.parametrize("optuna", [OPTUNA, QUERY])
def test_the_dumped_sweep_file_holds_no_password_and_still_parses(tmp_path, optuna):
    """sweep.yaml: written to the sweep's folder and logged on every run (driver, trial)."""
    text = dump_spec(_spec(tmp_path, optuna))
    assert not _leaks(text), text
    storage = parse_spec(yaml.safe_load(text)).storage
    assert storage.optuna == _masked(optuna) and storage.mlflow_tracking_uri == _masked(MLFLOW)


def test_state_json_holds_no_password_and_resume_takes_it_from_the_environment(
    tmp_path, monkeypatch
):
    from sweep.credentials import real_url, redact
    from sweep.layout import write_state

    spec = _spec(tmp_path)
    store = SweepLayout.of(spec).store()
    store.write(dump_spec(spec).encode(), "sweep.yaml")
    write_state(
        store,
        {"mlflow_tracking_uri": MLFLOW, "experiment": "e", "experiment_id": "1",
         "parent_run_id": "p", "optuna": OPTUNA},
    )  # fmt: skip
    for f in Path(store.location()).rglob("*"):
        assert not _leaks(f.read_bytes()), f
    storage = spec.storage.path
    monkeypatch.delenv("KDSWEEP_OPTUNA", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # no URL in the environment: none with a password; the clients' variables supply it
    # (PGPASSWORD / ~/.pgpass, MLFLOW_TRACKING_PASSWORD)
    state = open_sweep("tiny", storage).state
    assert state["optuna"] == "postgresql+psycopg2://kd@127.0.0.1:1/optuna?sslmode=disable"
    assert state["mlflow_tracking_uri"] == "http://kd@127.0.0.1:1"
    # the whole URL in the environment (spec.STORAGE_ENV): used as it is
    monkeypatch.setenv("KDSWEEP_OPTUNA", OPTUNA)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", MLFLOW)
    opened = open_sweep("tiny", storage)
    assert opened.state["optuna"] == opened.layout.optuna_url == OPTUNA
    assert opened.state["mlflow_tracking_uri"] == MLFLOW
    assert real_url(redact(QUERY), "optuna", {}) == (
        "postgresql://kd@127.0.0.1:1/optuna?sslmode=disable"
    )


def test_validate_warns_once_that_the_password_belongs_in_the_environment(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("KDSWEEP_OPTUNA", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    d = tiny_spec_dict(tmp_path)
    d["storage"] |= {"optuna": OPTUNA, "mlflow_tracking_uri": MLFLOW}
    file = tmp_path / "s.yaml"
    file.write_text(yaml.safe_dump(d))
    # nothing listens on port 1: validate refuses the stores (preflight), after the warnings,
    # and its refusal names them without their passwords too
    assert cli.main(["validate", str(file)]) == 2
    out, err = capsys.readouterr()
    assert not _leaks(out + err), out + err
    assert "allowed: a database server that answers" in err, err
    warnings = [ln for ln in err.splitlines() if "holds a password" in ln]
    assert len(warnings) == 2, err
    assert "$PGPASSWORD" in warnings[0] and "$KDSWEEP_OPTUNA" in warnings[0]
    assert "$MLFLOW_TRACKING_PASSWORD" in warnings[1]


def test_printed_hints_and_tags_hold_no_password(mlflow_db):
    from sweep.teachers import TeacherRecord
    from sweep.tracking import Tracker, ui_hint

    assert not _leaks(ui_hint(MLFLOW, "3")) and "kd:***@127.0.0.1:1" in ui_hint(MLFLOW, "3")
    tracker = Tracker(f"sqlite:///{mlflow_db}", "e")
    location = f"s3://AKID:{SECRET}@bucket/teachers/x"
    record = TeacherRecord("ab" * 8, {}, {}, location, event="trained")
    run = tracker.ensure_teacher_run(record, label="ce", params={}, parent_run_id=None, sweep="s")
    tags = tracker.client.get_run(run).data.tags
    assert tags["cache_location"] == "s3://AKID:***@bucket/teachers/x"


def test_a_pickled_searcher_holds_no_password(tmp_path):
    """Tune pickles its searcher into tune/tuner.pkl; resume gives it the URL again."""
    s = CellSearcher(_spec(tmp_path), OPTUNA)
    blob = pickle.dumps(s)
    assert not _leaks(blob)
    again = pickle.loads(blob)
    assert again.optuna_url == _masked(OPTUNA) and s.optuna_url == OPTUNA


def test_the_pickled_progress_callback_holds_no_password(tmp_path):
    """Tune pickles the run config, callbacks included, into tune/tuner.pkl."""
    from sweep.context import SweepContext
    from sweep.driver import Progress

    spec = _spec(tmp_path)
    layout = SweepLayout.of(spec)
    progress = Progress(SweepContext(spec, layout, MLFLOW, "e", None), console=None)
    assert not _leaks(pickle.dumps(progress))
    assert progress.ctx.tracking_uri == MLFLOW and progress.ctx.layout.optuna_url == OPTUNA


def test_mlflow_gets_the_password_from_its_own_variables():
    """So MLflow's own messages (its `View run ... at: URL` lines, request errors) hold none."""
    from sweep.credentials import mlflow_client_uri

    env: dict[str, str] = {}
    assert mlflow_client_uri(MLFLOW, env) == "http://127.0.0.1:1"
    assert env == {"MLFLOW_TRACKING_USERNAME": "kd", "MLFLOW_TRACKING_PASSWORD": SECRET}
    assert mlflow_client_uri("http://kd@h:1", env) == "http://kd@h:1"  # a user alone stays
    assert mlflow_client_uri("sqlite:////a:b@c/m.db", {}) == "sqlite:////a:b@c/m.db"


# --- item 4 -------------------------------------------------------------------------------------
def _searcher(tmp_path):
    spec = parse_spec(tiny_spec_dict(tmp_path))
    return spec, CellSearcher(spec, f"sqlite:///{tmp_path / 'optuna.db'}")


SEARCHER_STATE = ("handed", "live", "next_cell", "orphans", "repeats", "no_best", "ended")


def test_searcher_state_is_json_and_a_restore_gives_it_back(tmp_path):
    spec, s = _searcher(tmp_path)
    for i in range(5):
        s.suggest(f"t{i}")
    s.on_trial_complete("t1", {"epoch": 2, "val/robust_acc": 0.4})
    s.orphans.append((spec.cells()[0].key, 7))
    s.no_best.add(spec.cells()[1].key)
    path = tmp_path / "searcher-state.pkl"
    s.save(str(path))
    raw = path.read_bytes()
    assert raw.startswith(b"{") and json.loads(raw)["kdsweep"] == "searcher"
    again = CellSearcher(spec, s.optuna_url)
    again.restore(str(path))
    for k in SEARCHER_STATE:
        assert getattr(again, k) == getattr(s, k), k
    assert again._reconciled is False


class _Payload:
    """What a compromised worker would write: unpickling it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_in_place_of_the_state_is_refused_unloaded(tmp_path):
    from sweep.search import StateRefused

    spec, s = _searcher(tmp_path)
    marker = tmp_path / "ran"
    path = tmp_path / "searcher-state.pkl"
    path.write_bytes(pickle.dumps({"handed": _Payload(marker)}))
    with pytest.raises(StateRefused, match="refused"):
        s.restore(str(path))
    with pytest.raises(StateRefused):
        CellASHA(spec).restore(str(path))
    assert not marker.exists()
    path.write_text(json.dumps({"kdsweep": "scheduler", "version": 1, "state": {"cells": {}}}))
    with pytest.raises(StateRefused):  # the other kind's state is not this one's
        s.restore(str(path))


def test_scheduler_state_is_json_and_a_restore_gives_it_back(tmp_path):
    spec = parse_spec(tiny_spec_dict(tmp_path, budget={"trials_per_cell": 4, "epochs": 4}))
    asha = CellASHA(spec)
    trials = [
        SimpleNamespace(trial_id=f"t{i}", config=trial_config(c.key, number=i).to_dict())
        for i, c in enumerate(spec.cells()[:2] * 2)
    ]
    for t in trials:
        asha.on_trial_add(None, t)
    for i, t in enumerate(trials):
        asha.on_trial_result(None, t, {"epoch": 1, "val/robust_acc": 0.1 * i})
    path = tmp_path / "scheduler.json"
    asha.save(str(path))
    assert json.loads(path.read_bytes())["kdsweep"] == "scheduler"
    again = CellASHA(spec)
    again.restore(str(path))

    def shape(a):
        return {
            cell: (
                [[dict(r) for _, r in b._rungs] for b in x._brackets],
                {t: x._brackets.index(b) for t, b in x._trial_info.items()},
                x._num_stopped,
            )
            for cell, x in a._per_cell.items()
        }

    assert shape(again) == shape(asha) and again._added == asha._added
    assert any(r for cell in shape(asha).values() for b in cell[0] for r in b)


# --- item 5 -------------------------------------------------------------------------------------
BAD_NAMES = ["../x", "..", "/etc", "a/b", "a\\b", ".hidden", "x\n", "a\x00b", ""]


@pytest.mark.parametrize("cmd", ["resume", "status", "report", "evaluate", "dashboard"])
def test_commands_refuse_a_name_that_is_a_path(tmp_path, capsys, cmd):
    storage = tmp_path / "sweeps"
    (tmp_path / "x").mkdir()  # what `../x` would reach
    (tmp_path / "x" / "state.json").write_text("{}")
    for name in BAD_NAMES:
        rc = cli.main([cmd, name, "--storage", str(storage)])
        out, err = capsys.readouterr()
        assert rc == 2 and "is not a sweep name" in err, (cmd, name, rc, err)
        assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_an_experiment_name_never_becomes_an_artifact_root(tmp_path, mlflow_db):
    from sweep.driver import sweep_tracker

    d = tiny_spec_dict(tmp_path)
    d["storage"]["mlflow_experiment"] = str(tmp_path / "etc" / "cron.d")
    d["storage"]["mlflow_tracking_uri"] = f"sqlite:///{mlflow_db}"
    uri, experiment, tracker = sweep_tracker(parse_spec(d), "id0")
    root = tracker.client.get_experiment(tracker.experiment_id).artifact_location
    assert root == (mlflow_db.parent / "mlartifacts" / "tiny").as_uri()
    assert experiment == str(tmp_path / "etc" / "cron.d")


def test_report_out_refuses_a_folder_that_is_not_a_report(tmp_path, capsys):
    from sweep.layout import report_out

    out = tmp_path / "papers"
    out.mkdir()
    (out / "summary.md").parent.joinpath("notes.md").write_text("mine")
    rc = cli.main(["report", "tiny", "--storage", str(tmp_path), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "not a previous report" in err, err
    assert [p.name for p in out.iterdir()] == ["notes.md"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpecError, match="is a file"):
        report_out(tmp_path / "file")
    (out / "summary.md").write_text("# an earlier report")  # a report folder: replaced
    assert report_out(out) == out and report_out(tmp_path / "new") == tmp_path / "new"


# --- item 10 ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "a, b", [("mcmi(lambda=0.1).kd.pgd", "mcmi_lambda=0.1_.kd.pgd"), ("CE.kd.pgd", "ce.kd.pgd")]
)
def test_distinct_cells_never_share_a_checkpoint_folder(tmp_path, a, b):
    ka, kb = trial_config(a).key, trial_config(b).key
    assert ka.lower() != kb.lower()  # also on a case-insensitive filesystem
    assert re.fullmatch(r"[A-Za-z0-9._=,-]+/0", ka), ka  # still one safe folder per cell
    ckpt = TrialCheckpoints(str(tmp_path))
    ckpt.set_run_id(ka, "run-a")
    ckpt.set_run_id(kb, "run-b")
    assert (ckpt.run_id(ka), ckpt.run_id(kb)) == ("run-a", "run-b")


def test_a_sweep_checkpointed_before_the_hash_resumes_from_its_old_folders(tmp_path):
    config = trial_config("mcmi(lambda=0.1).kd.pgd", number=3)
    old = Store(tmp_path)  # the folder the naming before the hash gave this trial
    old.write(
        json.dumps({"mlflow_run_id": "old-run"}).encode(), "mcmi_lambda=0.1_.kd.pgd/3/run.json"
    )
    ckpt = TrialCheckpoints(str(tmp_path))
    assert ckpt.run_id(config.key) == "old-run"
    ckpt.set_outcome(config.key, "stopped")
    assert old.read("mcmi_lambda=0.1_.kd.pgd/3/outcome.json")
    assert [p.name for p in tmp_path.iterdir()] == ["mcmi_lambda=0.1_.kd.pgd"]
    fresh = TrialCheckpoints(str(tmp_path / "new"))  # a new sweep: the hashed folder
    fresh.set_run_id(config.key, "r")
    assert (tmp_path / "new" / config.key / "run.json").is_file()
