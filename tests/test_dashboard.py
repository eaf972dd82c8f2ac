"""`sweep dashboard NAME`: optuna-dashboard on a sweep's Optuna storage, as a user runs it.

The sweep is built without running it: its folder (sweep.yaml, state.json) as `sweep run`
writes them, and one real Optuna study per cell, `<sweep>/<cell>`, in its `optuna.db`. The
command runs as a real process on a free port; its JSON API (/api/studies, what the dashboard's
pages read) must list the sweep's studies, it must listen on 127.0.0.1 only, refuse writes, and
exit on SIGINT. The errors (no such sweep, port in use, storage missing or unreachable) run
in-process, as does SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from conftest import start_sweep_cli, stop_group, tiny_spec_dict, wait_until

from sweep import dashboard as dash
from sweep.cli import EXIT_BAD_INPUT, main
from sweep.layout import study_name
from sweep.spec import dump_spec, parse_spec

NAME = "dash"
PASSWORD = "hunter2-s3cret"


def make_sweep(tmp: Path, optuna_url: str | None = None, studies: bool = True) -> list[str]:
    """A started sweep `dash` under tmp/sweeps, as `sweep run` leaves it before any trial ends:
    sweep.yaml, state.json and (with `studies`) one study per cell holding one trial, plus a
    study of another sweep in the same storage. The sweep's study names."""
    spec = parse_spec(tiny_spec_dict(tmp, name=NAME))
    folder = tmp / "sweeps" / NAME
    folder.mkdir(parents=True)
    (folder / "sweep.yaml").write_text(dump_spec(spec))
    url = optuna_url or f"sqlite:///{folder}/optuna.db"
    state = {
        "mlflow_tracking_uri": "sqlite:///mlflow.db",
        "experiment": NAME,
        "parent_run_id": "0" * 32,  # never read by the dashboard, always written by a run
        "optuna": url,
    }
    (folder / "state.json").write_text(json.dumps(state))
    names = [study_name(NAME, c.key) for c in spec.cells()]
    if studies:
        storage = optuna.storages.RDBStorage(url)
        for n in [*names, "other/ce.kd.pgd"]:
            study = optuna.create_study(study_name=n, storage=storage, direction="maximize")
            study.optimize(lambda t: t.suggest_float("temperature", 1.0, 4.0), n_trials=1)
        storage.engine.dispose()
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listeners(port: int) -> list[str]:
    """The local addresses listening on TCP `port` (Linux: /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        lines = Path(table).read_text().splitlines()[1:] if Path(table).exists() else []
        for line in lines:
            fields = line.split()
            address, hexport = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                if len(raw) == 4:
                    found.append(socket.inet_ntoa(raw[::-1]))
                else:
                    found.append(table + ":" + address)
    return found


def get_json(url: str):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.load(r)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc/net/tcp")
def test_serves_the_sweeps_studies_on_loopback_read_only_until_sigint(tmp_path):
    names = make_sweep(tmp_path)
    port = free_port()
    log = tmp_path / "dashboard.log"
    proc = start_sweep_cli(
        tmp_path,
        "dashboard",
        NAME,
        "--storage",
        str(tmp_path / "sweeps"),
        "--port",
        str(port),
        log=log,
    )
    try:
        api = f"http://127.0.0.1:{port}/api/studies"
        listed = wait_until("the dashboard answers", lambda: get_json(api), proc, log, timeout=60)
        got = {s["study_name"]: s for s in listed["study_summaries"]}
        assert set(got) == {*names, "other/ce.kd.pgd"}

        assert listeners(port) == ["127.0.0.1"], listeners(port)
        out = log.read_text()
        assert f"http://127.0.0.1:{port}/dashboard" in out
        assert "Ctrl-C" in out
        assert f"{len(names)} of {len(names)} cells have a study" in out
        assert "(and 1 of other sweeps)" in out
        assert "warning" not in out
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard", timeout=2)
        assert page.status == 200 and b"<html" in page.read().lower()

        # a study's page: its trial (what the dashboard draws its charts from)
        sid = got[names[0]]["study_id"]
        detail = get_json(f"{api}/{sid}?after=0")
        assert detail["name"] == names[0] and len(detail["trials"]) == 1, detail
        assert detail["trials"][0]["params"][0]["name"] == "temperature"

        # read-only: deleting a cell's study is refused and the study is still there
        req = urllib.request.Request(f"{api}/{sid}", method="DELETE")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=2)
        assert refused.value.code == 405
        again = {s["study_name"] for s in get_json(api)["study_summaries"]}
        assert names[0] in again

        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C at a terminal
        # a deadline, not a wait: it exits in ~1.5 s idle (torch, pyarrow and MLflow are
        # loaded since `--storage` is checked first), but took over 10 s once in a loaded CI
        assert proc.wait(timeout=60) == 0, log.read_text()
        assert listeners(port) == []
    finally:
        stop_group(proc)


def test_sigterm_stops_the_server_and_frees_the_port():
    """serve_forever, in this process's main thread (where signals land), on a tiny app."""

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    httpd = dash.listen(app, "127.0.0.1", 0)
    port = httpd.server_port
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    before = signal.getsignal(signal.SIGTERM)
    dash.serve_forever(httpd)  # returns on SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    with socket.socket() as s:  # closed: the port can be bound again
        s.bind(("127.0.0.1", port))


def _cli(capsys, tmp_path, *args: str) -> tuple[int, str, str]:
    rc = main(["dashboard", NAME, "--storage", str(tmp_path / "sweeps"), *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_no_such_sweep_is_the_error_other_commands_give(tmp_path, capsys):
    rc, _, err = _cli(capsys, tmp_path)
    assert rc == EXIT_BAD_INPUT
    assert err.startswith(f"error: no sweep '{NAME}' under") and "--storage" in err


def test_a_port_in_use_is_named_with_the_way_out(tmp_path, capsys):
    make_sweep(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, out, err = _cli(capsys, tmp_path, "--port", str(port))
    assert rc == EXIT_BAD_INPUT
    assert f"port {port} is in use" in err and "--port" in err, err
    assert "http://" not in out  # no URL of a server that is not there
    rc, _, err = _cli(capsys, tmp_path, "--port", "70000")
    assert rc == EXIT_BAD_INPUT and "--port 70000" in err, err


def test_a_sweep_without_its_storage_yet_says_so_and_creates_nothing(tmp_path, capsys):
    make_sweep(tmp_path, studies=False)
    rc, _, err = _cli(capsys, tmp_path)
    assert rc == EXIT_BAD_INPUT and "no Optuna storage yet" in err, err
    assert not (tmp_path / "sweeps" / NAME / "optuna.db").exists()


def test_an_unreachable_storage_is_reported_without_its_password(tmp_path, capsys):
    url = f"postgresql://kd:{PASSWORD}@127.0.0.1:1/optuna?sslmode=disable&password={PASSWORD}"
    make_sweep(tmp_path, optuna_url=url, studies=False)
    rc, out, err = _cli(capsys, tmp_path)
    assert rc == EXIT_BAD_INPUT and "cannot read the Optuna storage" in err, err
    assert "postgresql://kd:***@127.0.0.1:1/optuna" in err
    assert PASSWORD not in out + err


@pytest.mark.parametrize(
    "url, shown",
    [
        ("sqlite:////home/a@b/sweeps/x/optuna.db", "sqlite:////home/a@b/sweeps/x/optuna.db"),
        ("postgresql://kd@db:5432/optuna", "postgresql://kd@db:5432/optuna"),
        ("postgresql://kd:pw@db:5432/optuna", "postgresql://kd:***@db:5432/optuna"),
        ("postgresql+psycopg2://kd:p%40ss@db/o", "postgresql+psycopg2://kd:***@db/o"),
        ("postgresql://kd:p@s/s@db/o", "postgresql://kd:***@db/o"),  # unencoded @ and /
        ("postgresql://kd@db/o?password=pw&x=1", "postgresql://kd@db/o?password=***&x=1"),
    ],
)
def test_redact_hides_every_password(url, shown):
    assert dash.redact(url) == shown


def test_listening_beyond_loopback_warns_in_one_line(tmp_path, capsys, monkeypatch):
    """--host 0.0.0.0, the socket and the serving left out (no test listens beyond loopback)."""
    make_sweep(tmp_path)

    class Bound:
        server_port = 8080

    monkeypatch.setattr(dash, "listen", lambda app, host, port: Bound())
    monkeypatch.setattr(dash, "serve_forever", lambda httpd: None)
    rc, out, err = _cli(capsys, tmp_path, "--host", "0.0.0.0")
    assert rc == 0
    (line,) = err.splitlines()
    assert line.startswith("warning: listening on 0.0.0.0") and "no authentication" in line
    assert dash.is_loopback("127.0.0.1") and dash.is_loopback("::1")
    assert dash.is_loopback("localhost") and not dash.is_loopback("0.0.0.0")
