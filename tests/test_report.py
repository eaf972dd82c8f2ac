"""`sweep report`: tables, summary and plots of real tiny sweeps (real Ray, Optuna and MLflow).

Two sweeps, shared by the tests: one on a SQLite store (the default), one against a real
`mlflow server`. States a stopped sweep leaves behind (a trial never started, one
still RUNNING, seed repeats of a configuration) are made with the real MLflow client on the
finished sweep and undone afterwards.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import optuna
import pandas as pd
import pytest
import yaml
from conftest import (
    free_port,
    start_mlflow_server,
    start_sweep_cli,
    stop_group,
    sweep_cli,
    tiny_spec_dict,
    wait_mlflow_healthy,
)
from mlflow.tracking import MlflowClient

from sweep.layout import SweepLayout, open_sweep, study_name
from sweep.progress import cell_trials
from sweep.report import best_configs, pareto_front, write_report
from sweep.report.footnotes import MARK, Footnotes, footnotes
from sweep.search import CellSearcher
from sweep.space import is_searched
from sweep.spec import parse_spec

pytestmark = pytest.mark.integration

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CELLS = ["ce.kd.none", "mse.kd.none"]
ATTACKS = ["fgsm", "pgd5"]
PROMISED = [
    "run_id",
    "run_name",
    "status",
    "cell",
    "teacher_loss",
    "method",
    "train_attack",
    "optuna_trial",
    "seed",
    "epochs_trained",
    "failure_reason",
    "param.temperature",
    "param.alpha",
    "param.seed",
    "val/clean_acc",
    "val/robust_acc",
    "val/loss",
    "test/clean_acc",
    "test/robust_acc/fgsm",
    "test/robust_acc/pgd5",
]


def _start_sweep(tmp_path: Path, name: str, grid: dict, **over: object) -> subprocess.Popen:
    """A tiny sweep in the background: 2 cells x 2 trials x 1 epoch, 60 validation and test
    examples; its output goes to `<name>.log`."""
    spec = tiny_spec_dict(
        tmp_path,
        name=name,
        grid=grid,
        teacher={"epochs": 1},
        search_space={"temperature": {"type": "float", "low": 1.0, "high": 4.0}},
        budget={"trials_per_cell": 2, "epochs": 1, "grace_period": 1},
        evaluation={
            "attacks": ATTACKS,
            "val_attack": "pgd2",
            "val_examples": 60,
            "test_examples": 60,
        },
        **over,
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    # its own session: stopped with its Ray processes if the test gives up
    return start_sweep_cli(tmp_path, "run", f"{name}.yaml", log=tmp_path / f"{name}.log")


def _finish(proc: subprocess.Popen, log: Path) -> None:
    proc.wait(timeout=600)
    assert proc.returncode == 0, log.read_text()[-5000:]


def _snapshot(client: MlflowClient, exp_id: str, optuna_url: str) -> dict:
    """Everything a report must leave as it was: every run's status, params, tags, metrics,
    and every Optuna trial."""
    runs = {
        r.info.run_id: (r.info.status, r.data.params, r.data.tags, r.data.metrics)
        for r in client.search_runs([exp_id], max_results=1000)
    }
    storage = optuna.storages.RDBStorage(optuna_url)
    studies = {
        s: [
            (t.number, t.state, t.values, t.params)
            for t in optuna.load_study(study_name=s, storage=storage).trials
        ]
        for s in optuna.get_all_study_names(storage)
    }
    return {"runs": runs, "studies": studies}


@pytest.fixture(scope="module")
def finished(sweeps):
    """The SQLite sweep `rep` (ce and mse teachers, kd, no training attack), reported once
    through the CLI."""
    tmp = sweeps.local
    storage = tmp / "sweeps"
    state = json.loads((storage / "rep" / "state.json").read_text())
    client = MlflowClient(state["mlflow_tracking_uri"])
    before = _snapshot(client, state["experiment_id"], state["optuna"])
    r = sweep_cli(tmp, "report", "rep", "--storage", str(storage))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return SimpleNamespace(
        tmp=tmp,
        storage=storage,
        out=storage / "rep" / "report",
        stdout=r.stdout,
        state=state,
        client=client,
        exp_id=state["experiment_id"],
        parent=state["parent_run_id"],
        before=before,
    )


def _students(client: MlflowClient, exp_id: str, extra: str = "") -> list:
    flt = "tags.kind = 'student'" + (f" and {extra}" if extra else "")
    return client.search_runs([exp_id], flt, max_results=1000)


def _row(summary: str, cell: str) -> str:
    """The best-configuration table's row of `cell`."""
    return next(ln for ln in summary.splitlines() if ln.startswith(f"| {cell} |"))


def _val_best(runs: list, cell: str):
    """Independently of the report: the cell's finished run with the highest val/robust_acc,
    the earliest Optuna trial on a tie."""
    mine = [r for r in runs if r.data.tags["cell"] == cell and r.info.status == "FINISHED"]
    return max(
        mine,
        key=lambda r: (r.data.metrics["val/robust_acc"], -int(r.data.tags["optuna_trial"])),
    )


def _assert_real_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000, path
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 200, img.shape
    assert img[..., :3].std() > 0.01, f"{path} is blank"  # axes, points, text were drawn


# --- a finished sweep -------------------------------------------------------------------------
def test_table_has_one_row_per_trial_with_the_promised_columns(finished):
    runs = _students(finished.client, finished.exp_id)
    assert len(runs) == 4
    df = pd.read_parquet(finished.out / "trials.parquet")
    csv = pd.read_csv(finished.out / "trials.csv")
    assert sorted(df["run_id"]) == sorted(r.info.run_id for r in runs)  # no teacher, no parent
    assert list(csv.columns) == list(df.columns) and len(csv) == len(df)
    assert set(PROMISED) <= set(df.columns), set(PROMISED) - set(df.columns)
    assert df["optuna_trial"].dtype == "Int64" and df["param.temperature"].dtype == float
    by_id = df.set_index("run_id")
    for r in runs:
        row = by_id.loc[r.info.run_id]
        assert row["cell"] == r.data.tags["cell"] and row["status"] == "FINISHED"
        assert row["run_name"] == r.info.run_name and row["epochs_trained"] == 1
        assert row["seed"] == int(r.data.params["seed"])
        assert row["param.temperature"] == pytest.approx(float(r.data.params["temperature"]))
        for m in ("val/robust_acc", "test/clean_acc", "test/robust_acc/pgd5"):
            assert row[m] == pytest.approx(r.data.metrics[m])
    assert list(df["cell"]) == ["ce.kd.none"] * 2 + ["mse.kd.none"] * 2  # grid order


def test_summary_names_every_cell_and_its_best_by_validation(finished):
    summary = (finished.out / "summary.md").read_text()
    runs = _students(finished.client, finished.exp_id)
    notes = footnotes(open_sweep("rep", finished.storage).spec)
    best = {}
    for cell in CELLS:
        b = best[cell] = _val_best(runs, cell)
        row = _row(summary, cell)
        assert f"`{b.info.run_name}`" in row
        cols = [c.strip() for c in row.strip("|").split("|")]
        teacher = cell.split(".")[0]
        assert cols[1:3] == [notes.teacher(teacher), notes.method("kd")]  # marked as footnoted
        assert cols[4] == "1" and cols[5] == f"{b.data.metrics['val/robust_acc']:.4f}"
        assert cols[6:9] == [
            f"{100 * b.data.metrics[m]:.2f}"
            for m in ("test/clean_acc", "test/robust_acc/fgsm", "test/robust_acc/pgd5")
        ]
    # teacher-loss comparison: mse's paired gain over ce, in percentage points
    mse = notes.teacher("mse")
    gain = next(ln for ln in summary.splitlines() if ln.startswith(f"| none | {mse} |"))
    cols = [c.strip() for c in gain.strip("|").split("|")]
    assert cols[2] == "—"  # clean, seeds basis: this sweep runs no seed repeats
    spec = open_sweep("rep", finished.storage).spec
    searched = [k for k, v in spec.cell_space("kd").items() if is_searched(v)]
    by = {(r.data.tags["cell"], r.data.tags["optuna_trial"]): r for r in runs}
    m = "test/clean_acc"
    diffs = [
        100 * (by["mse.kd.none", k].data.metrics[m] - by["ce.kd.none", k].data.metrics[m])
        for k in ("0", "1")
        if all(
            by["mse.kd.none", k].data.params[p] == by["ce.kd.none", k].data.params[p]
            for p in searched
        )
    ]
    assert diffs  # trial 0 is kd's paper setting in both cells (and paired draws after it)
    assert cols[3] == f"{sum(diffs) / len(diffs):+.2f} (n={len(diffs)}, no CI)"
    assert "## Missing" in summary and "Nothing: every trial finished." in summary
    assert f"| {notes.teacher('ce')} |" in summary and f"| {mse} |" in summary  # teachers
    assert str(finished.out) in finished.stdout and "nothing missing" in finished.stdout


def test_summary_footnotes_each_method_and_teacher_loss(finished):
    """The fidelity section under the tables: kd (the method) and both teacher losses, each
    with its tag, source and departures, marked as in the tables."""
    summary = (finished.out / "summary.md").read_text()
    section = summary.split("## Fidelity", 1)[1].split("## Missing", 1)[0]
    methods, losses = section.split("### Teacher losses")
    notes = footnotes(open_sweep("rep", finished.storage).spec)
    assert list(notes.methods) == ["kd"] and set(notes.losses) == {"ce", "mse"}
    for name, f in notes.methods.items():
        mark = notes.method(name).removeprefix(name)  # the teacher labels are the loss names
        assert mark in ("", MARK) and f"- `{name}`{mark}: {f.tag()}, " in methods
        assert all(f"  - {d}" in methods for d in f.departures)
    for name, f in notes.losses.items():
        mark = notes.teacher(name).removeprefix(name)
        assert mark in ("", MARK) and f"- `{name}`{mark}: {f.tag()}, " in losses
        assert f.source.rstrip(". ") in losses
        assert all(f"  - {d}" in losses for d in f.departures)


def test_plots_are_real_images(finished):
    _assert_real_png(finished.out / "pareto.png")
    for cell in CELLS:
        _assert_real_png(finished.out / "history" / f"{cell}.png")
    assert len(list((finished.out / "history").iterdir())) == len(CELLS)


def test_parent_run_holds_the_report_and_nothing_else_changed(finished):
    client = finished.client
    names = {a.path for a in client.list_artifacts(finished.parent, "report")}
    assert {
        "report/trials.parquet",
        "report/trials.csv",
        "report/summary.md",
        "report/pareto.png",
        "report/history",
    } <= names
    history = {a.path for a in client.list_artifacts(finished.parent, "report/history")}
    assert history == {f"report/history/{c}.png" for c in CELLS}
    got = Path(client.download_artifacts(finished.parent, "report/pareto.png", str(finished.tmp)))
    assert got.read_bytes()[:8] == PNG_SIGNATURE
    after = _snapshot(client, finished.exp_id, finished.state["optuna"])
    assert after == finished.before  # read-only: no run, tag, metric or Optuna trial touched


def test_best_is_chosen_on_validation_and_repeats_average(finished):
    """On the real table: a test number never moves the choice, a validation number does, and
    the runs of one configuration (a trial and its seed repeats) give mean ± std over n."""
    spec = open_sweep("rep", finished.storage).spec
    df = pd.read_parquet(finished.out / "trials.parquet")
    cell = df[df["cell"] == "ce.kd.none"].copy()
    val_best = cell.loc[cell["val/robust_acc"].idxmax(), "run_id"]
    other = cell.index[cell["run_id"] != val_best][0]
    cell.loc[other, ["test/clean_acc", "test/robust_acc/fgsm", "test/robust_acc/pgd5"]] = 1.0
    best = best_configs(spec, cell)["ce.kd.none"]
    assert best.config == cell.loc[cell["run_id"] == val_best, "config"].item()
    assert best.n == 1 and best.mean["test/clean_acc"] < 1.0
    cell.loc[other, "val/robust_acc"] = 2.0  # now the other one wins on validation
    assert best_configs(spec, cell)["ce.kd.none"].config == cell.loc[other, "config"]

    # a repeat of the winner with a worse validation value stays one configuration of n=2
    winner = cell.loc[other]
    repeat = winner.copy()
    repeat[["run_id", "repeat", "val/robust_acc", "test/clean_acc"]] = ["r1", 1, 0.0, 0.5]
    both = pd.concat([cell, repeat.to_frame().T], ignore_index=True)
    both["repeat"] = both["repeat"].astype("Int64")
    b = best_configs(spec, both)["ce.kd.none"]
    assert b.config == winner["config"] and b.n == 2 and b.score == 2.0
    assert b.mean["test/clean_acc"] == pytest.approx(0.75)
    assert b.std["test/clean_acc"] == pytest.approx(pd.Series([1.0, 0.5]).std())


def test_pareto_front_and_study_names(tmp_path):
    pts = [(1.0, 3.0), (2.0, 2.0), (1.5, 1.0), (3.0, 0.0), (2.0, 1.5)]
    assert pareto_front(pts) == [(1.0, 3.0), (2.0, 2.0), (3.0, 0.0)]
    # one definition (layout.study_name): the searcher names a cell's study by it, and the
    # readers (report and status, through progress.cell_trials) find the study by it
    spec = parse_spec(tiny_spec_dict(tmp_path))
    layout = SweepLayout.of(spec)
    Path(layout.sweep).mkdir(parents=True)
    searcher = CellSearcher(spec, layout.optuna_url)
    handed = searcher.suggest("t0")
    cell = handed["cell"]
    assert searcher.study(cell).study_name == layout.study_name(cell) == study_name("tiny", cell)
    read = cell_trials(spec, layout, create=False)
    assert list(read) == [cell] and [t.number for t in read[cell]] == [handed["number"]]


def test_missing_sweep_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sweep 'nosuch'"):
        write_report("nosuch", tmp_path)
    assert not (tmp_path / "nosuch").exists()


# --- states of a stopped or extended sweep, made with the real client and undone ---------------
@contextmanager
def _stopped(client: MlflowClient, runs: dict) -> object:
    """`ce.kd.none#0` never started (its run deleted) and `ce.kd.none#1` still RUNNING."""
    never, running = runs["ce.kd.none#0"], runs["ce.kd.none#1"]
    client.delete_run(never.info.run_id)
    client.update_run(running.info.run_id, status="RUNNING")
    try:
        yield
    finally:
        client.restore_run(never.info.run_id)
        client.set_terminated(running.info.run_id, status="FINISHED")


def test_report_on_a_stopped_sweep_names_what_is_missing(finished):
    client = finished.client
    runs = {r.info.run_name: r for r in _students(client, finished.exp_id)}
    out = finished.tmp / "stopped-report"
    with _stopped(client, runs):
        printed = write_report("rep", finished.storage, out=out)
    summary = (out / "summary.md").read_text()
    missing = summary.split("## Missing", 1)[1]
    assert "3 of 4 planned trials" in missing and "`ce.kd.none` 1/2" in missing
    assert "`ce.kd.none`: no finished trial (1 RUNNING)" in missing
    assert "`ce.kd.none#1` is RUNNING, at epoch 1" in missing
    assert "mse.kd.none" not in missing  # its two trials finished
    assert "no finished trial" in _row(summary, "ce.kd.none")
    assert "`ce.kd.none` has no finished trial yet: no comparison" in summary
    assert f"`{_val_best(list(runs.values()), 'mse.kd.none').info.run_name}`" in _row(
        summary, "mse.kd.none"
    )
    df = pd.read_parquet(out / "trials.parquet")
    assert len(df) == 3 and sorted(df["status"]) == ["FINISHED", "FINISHED", "RUNNING"]
    _assert_real_png(out / "pareto.png")
    assert "missing (" in printed and "3 of 4 planned trials" in printed


def test_seed_repeats_are_reported_as_one_configuration(finished):
    """Tag mse.kd.none#0 as repeat 1 of #1's configuration (what a re-run with a new seed
    carries): the report averages the two runs and names the configuration once."""
    client = finished.client
    runs = {r.info.run_name: r for r in _students(client, finished.exp_id)}
    tuned, rerun = runs["mse.kd.none#1"], runs["mse.kd.none#0"]
    key = tuned.data.tags["config_key"]
    old = rerun.data.tags["config_key"]
    client.set_tag(rerun.info.run_id, "config_key", key)
    client.set_tag(rerun.info.run_id, "repeat", "1")
    try:
        write_report("rep", finished.storage, out=finished.tmp / "repeats")
    finally:
        client.set_tag(rerun.info.run_id, "config_key", old)
        client.delete_tag(rerun.info.run_id, "repeat")
    summary = (finished.tmp / "repeats" / "summary.md").read_text()
    cols = [c.strip() for c in _row(summary, "mse.kd.none").strip("|").split("|")]
    clean = [r.data.metrics["test/clean_acc"] for r in (tuned, rerun)]
    mean, std = 100 * pd.Series(clean).mean(), 100 * pd.Series(clean).std()
    assert cols[4] == "2" and cols[6] == f"{mean:.2f} ± {std:.2f}"
    assert cols[5] == f"{tuned.data.metrics['val/robust_acc']:.4f}"  # chosen on the tuned trial
    df = pd.read_parquet(finished.tmp / "repeats" / "trials.parquet").set_index("run_name")
    assert df.loc["mse.kd.none#0", "repeat"] == 1 and df.loc["mse.kd.none#0", "config"] == key


# --- against a real MLflow tracking server -----------------------------------------------------
@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """Both tiny sweeps: `rep` on a SQLite store in `local/`, then `srv` (kd with a ce teacher,
    and the teacher-free ce baseline) logged to a real `mlflow server` in `server/`. The server
    starts while `rep` runs; the sweeps run one after the other, as two Ray clusters started
    together on one machine interfered here (lost objects, a failed exit)."""
    root = tmp_path_factory.mktemp("report")
    local, remote = root / "local", root / "server"
    remote.mkdir()
    url = f"http://127.0.0.1:{free_port()}"
    started = [start_mlflow_server(remote, int(url.rsplit(":", 1)[1]))]
    try:
        grid = {"teacher_loss": ["ce", "mse"], "method": ["kd"], "train_attack": ["none"]}
        started.append(_start_sweep(local, "rep", grid))
        _finish(started[1], local / "rep.log")
        wait_mlflow_healthy(url, started[0], remote / "server.log")
        grid = {"teacher_loss": ["ce"], "method": ["kd", "ce"], "train_attack": ["none"]}
        # with a password in the URI (MLflow's client sends it, this server ignores it): never
        # written nor printed (test_a_password_in_the_tracking_uri_is_never_written_or_printed)
        uri = url.replace("http://", f"http://kd:{PASSWORD}@")
        storage = {"path": str(remote / "sweeps"), "mlflow_tracking_uri": uri}
        started.append(_start_sweep(remote, "srv", grid, storage=storage))
        _finish(started[2], remote / "srv.log")
        server = SimpleNamespace(tmp=remote, url=url, storage=remote / "sweeps")
        yield SimpleNamespace(local=local, server=server)
    finally:
        for proc in reversed(started):  # sweeps left running by a failure, then the server
            stop_group(proc, grace=30)


@pytest.fixture(scope="module")
def server_sweep(sweeps):
    return sweeps.server


PASSWORD = "pw-Never-Written-7"


def test_a_password_in_the_tracking_uri_is_never_written_or_printed(server_sweep):
    """Issue 19, item 3, end to end: `srv` ran with its password in the tracking URI. No file
    of the sweep (sweep.yaml, state.json, Tune's experiment, checkpoints), of the server's
    store and artifacts (sweep.yaml logged on every run, tags), nor `sweep run`'s or `sweep
    status`'s output holds it; status connects with the stored, password-free URI."""
    tmp = server_sweep.tmp
    r = sweep_cli(tmp, "status", "srv", "--storage", str(server_sweep.storage))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "MLflow: http://kd@127.0.0.1:" in r.stdout  # what it connected with
    assert PASSWORD not in r.stdout + r.stderr
    files = [p for p in tmp.rglob("*") if p.is_file() and p.name != "srv.yaml"]  # the user's
    assert len(files) > 20 and tmp / "srv.log" in files
    assert [p for p in files if PASSWORD.encode() in p.read_bytes()] == []


def _ui_search(url: str, exp_id: str, flt: str) -> list[dict]:
    """The request the MLflow UI's runs table sends."""
    body = json.dumps({"experiment_ids": [exp_id], "filter": flt, "max_results": 100})
    req = urllib.request.Request(
        f"{url}/ajax-api/2.0/mlflow/runs/search",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read()).get("runs", [])


def test_a_sweep_on_an_mlflow_server_shows_its_trials_and_report(server_sweep):
    client = MlflowClient(server_sweep.url)
    exp = client.get_experiment_by_name("srv")
    runs = _students(client, exp.experiment_id)
    assert sorted(r.data.tags["cell"] for r in runs) == sorted(["ce.kd.none", "none.ce.none"] * 2)
    assert len({r.data.tags["optuna_trial"] + r.data.tags["cell"] for r in runs}) == 4
    for r in runs:
        assert r.info.status == "FINISHED"
        tags = r.data.tags
        assert tags["sweep"] == "srv" and tags["cell"].split(".") == [
            tags["teacher_loss"],
            tags["method"],
            tags["train_attack"],
        ]
        assert {"seed", "method", "teacher_loss", "epochs", "dataset"} <= set(r.data.params)
        assert {"val/robust_acc", "val/clean_acc", "test/clean_acc"} | {
            f"test/robust_acc/{a}" for a in ATTACKS
        } <= set(r.data.metrics)
    kd = _students(client, exp.experiment_id, "tags.method = 'kd'")
    assert len(kd) == 2 and {r.data.tags["method"] for r in kd} == {"kd"}
    assert "temperature" in kd[0].data.params
    ui = _ui_search(server_sweep.url, exp.experiment_id, "tags.method = 'ce'")
    assert len(ui) == 2 and all({"key": "method", "value": "ce"} in r["data"]["tags"] for r in ui)

    printed = write_report("srv", server_sweep.storage)
    assert "nothing missing" in printed
    (parent,) = client.search_runs([exp.experiment_id], "tags.kind = 'sweep'")
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/summary.md", "report/trials.parquet", "report/pareto.png"} <= names
    history = {a.path for a in client.list_artifacts(parent.info.run_id, "report/history")}
    assert history == {"report/history/ce.kd.none.png", "report/history/none.ce.none.png"}
    summary = Path(
        client.download_artifacts(parent.info.run_id, "report/summary.md", str(server_sweep.tmp))
    ).read_text()
    assert f"### {Footnotes().method('ce')}\n\nNo teacher: not compared." in summary
    assert "| none.ce.none |" in summary and "| ce.kd.none |" in summary
