"""The documented `ray job submit` path (cluster/README.md, issue 7) against a real local cluster.

A head started with `ray start --head` on 127.0.0.1, with token authentication and the shared
storage variables (KDSWEEP_STORAGE, KDSWEEP_TEACHERS, KDSWEEP_OPTUNA, MLFLOW_TRACKING_URI) in
its environment, as every cluster config sets them on every node. From a client shell holding
only RAY_ADDRESS and the token settings, exactly the README's commands: `ray job submit
--working-dir . -- sweep run search_spaces/<file>.yaml`, `ray job status`, `ray job logs`.
The sweep's checkpoints, teachers, Optuna studies and MLflow runs must land in the shared
places, its trials on the cluster's node; a client without the token must be refused.

The cluster is this test's alone: its own ports, its own --temp-dir, and it is taken down by
killing the processes that carry a marker only its `ray start` was given — never `ray stop`,
which stops every Ray on the machine.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from sweep.config import cell_folder

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command, of this interpreter
MARK = "KDSWEEP_TEST_RAY_CLUSTER"  # given to `ray start` only; every process of it inherits it
SWEEP = "jobtiny"
CELL = "ce.kd.none"
TRIALS = 2
# what a sweep writes where its file's `storage:` says (./sweeps, ./mlflow.db, ./mlartifacts)
SHARED_NAMES = {"sweeps", "mlflow.db", "mlartifacts"}

# search_spaces/quickstart.yaml cut down: one cell, two trials of one epoch, few examples.
TINY = {
    "name": SWEEP,
    "seed": 0,
    "dataset": {"name": "digits"},
    "student": {"arch": "small_cnn"},
    "teacher": {"arch": "small_cnn", "epochs": 1},
    "grid": {"teacher_loss": ["ce"], "method": ["kd"], "train_attack": ["none"]},
    "threat": {"eps": 0.1},
    "search_space": {
        "temperature": {"type": "float", "low": 1.0, "high": 4.0},
        "alpha": {"type": "float", "low": 0.2, "high": 0.8},
    },
    "budget": {"trials_per_cell": TRIALS, "epochs": 1, "grace_period": 1},
    "evaluation": {
        "attacks": ["fgsm"],
        "val_attack": "pgd3",
        "val_examples": 60,
        "test_examples": 60,
    },
    "resources": {"cpus_per_trial": 1},
    # what a laptop would use: the nodes' environment must override all of it
    "storage": {"path": "./sweeps", "mlflow_tracking_uri": "sqlite:///mlflow.db"},
}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _marked_pids(mark: str) -> list[int]:
    """Live processes (zombies excepted) whose environment carries this cluster's marker:
    GCS, raylet, dashboard, agents, workers, and job drivers, which Ray starts in sessions of
    their own."""
    tag = f"{MARK}={mark}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if tag not in (d / "environ").read_bytes().split(b"\0"):
                continue
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if state != "Z":
            pids.append(int(d.name))
    return pids


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(mark: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := _marked_pids(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _kill_cluster(mark: str) -> list[int]:
    """SIGTERM every process of the cluster, SIGKILL what is left after a grace period (the
    GCS ignores SIGTERM for a long while); returns what is still alive after that."""
    _signal_all(_marked_pids(mark), signal.SIGTERM)
    _signal_all(_wait_gone(mark, 3), signal.SIGKILL)
    return _wait_gone(mark, 15)


def _listening_addresses(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the given processes listen on, from /proc."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    out = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            hexaddr, port = f[1].split(":")
            raw = bytes.fromhex(hexaddr)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            out.add((socket.inet_ntop(family, raw), int(port, 16)))
    return out


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _ray(args: list[str], env: dict, cwd: Path | None = None, timeout: float = 120):
    """`ray ARGS` as a shell would run it; output without the colours Ray adds regardless."""
    r = subprocess.run(
        RAY + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    r.stdout, r.stderr = ANSI.sub("", r.stdout), ANSI.sub("", r.stderr)
    return r


def _out(r: subprocess.CompletedProcess) -> str:
    return f"rc={r.returncode}\n--- stdout\n{r.stdout[-6000:]}\n--- stderr\n{r.stderr[-6000:]}"


def _copy_checkout(dest: Path) -> None:
    """What `--working-dir .` uploads from this checkout (every file .gitignore does not
    ignore, new ones too), minus .git: the working tree as it is now, changes included."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = REPO / name
        if src.is_file():  # a tracked file deleted in the working tree is not
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.fixture
def cluster(tmp_path):
    """A head as the cluster configs start one, its shared storage under tmp_path/shared."""
    if sys.platform != "linux":
        pytest.skip("finds the cluster's processes through /proc")
    from ray._private.utils import get_dashboard_dependency_error

    missing = get_dashboard_dependency_error()
    if missing is not None:
        import ray

        pytest.fail(  # the test extra installs it: missing means a broken install, not a skip
            f"`ray job` needs Ray's dashboard (pip install 'ray[default]=={ray.__version__}'): "
            f"{missing}"
        )
    shared = tmp_path / "shared"
    shared.mkdir()
    token = tmp_path / "ray_auth_token"
    token.write_text(secrets.token_hex(32) + "\n")  # as `openssl rand -hex 32` in the README
    token.chmod(0o600)
    # Ray's socket paths must stay under 107 characters: pytest's tmp_path is too deep
    temp_dir = Path(tempfile.mkdtemp(prefix="kdray-", dir="/tmp"))
    gcs, dashboard, agent, client, metrics, autoscaler_metrics, dashboard_metrics = _free_ports(7)
    mark = uuid.uuid4().hex
    # nothing of this process's Ray, storage or import path leaks into the cluster or clients
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_", "KDSWEEP_", "MLFLOW_")) and k != "PYTHONPATH"
    }
    node_env = {
        **base,
        MARK: mark,
        # Loopback only (DESIGN §3.8). Without this, on Linux, even with --node-ip-address and
        # --dashboard-host 127.0.0.1 the GCS and raylet listen on all interfaces and the Ray
        # client server and dashboard agent on the machine's address.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # fixed by default (44217, 44227): a second cluster on this machine must not collide
        "AUTOSCALER_METRIC_PORT": str(autoscaler_metrics),
        "DASHBOARD_METRIC_PORT": str(dashboard_metrics),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "KDSWEEP_STORAGE": str(shared / "sweeps"),
        "KDSWEEP_TEACHERS": str(shared / "teachers"),
        "KDSWEEP_OPTUNA": f"sqlite:///{shared / 'optuna.db'}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{shared / 'mlflow.db'}",
        # the job's `sweep` is the console script of this interpreter's environment
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    client_env = {
        **base,
        "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
    }
    start = [
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}",
        f"--ray-client-server-port={client}",
        f"--metrics-export-port={metrics}",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    info = {
        "shared": shared,
        "token": token,
        "temp_dir": temp_dir,
        "client_env": client_env,
        "dashboard": dashboard,
        "mark": mark,
    }
    try:
        r = subprocess.run(
            RAY + start,
            env=node_env,
            capture_output=True,
            text=True,
            timeout=120,
            start_new_session=True,  # no signal of pytest's terminal reaches the cluster
        )
        assert r.returncode == 0, _out(r)
        _wait_for_job_api(dashboard, token.read_text())
        yield info
    finally:
        left = _kill_cluster(mark)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test cluster survived: {left}"


def _get_json(port: int, path: str, token: str | None) -> dict:
    """GET the dashboard's REST API, with the token as `ray job` sends it (or without)."""
    headers = {"Authorization": f"Bearer {token.strip()}"} if token else {}
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _http_status(port: int, path: str, token: str | None) -> int:
    try:
        _get_json(port, path, token)
        return 200
    except urllib.error.HTTPError as e:
        return e.code


def _wait_for_job_api(port: int, token: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            _get_json(port, "/api/version", token)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def test_the_documented_ray_job_submit_path_on_a_local_token_cluster(tmp_path, cluster):
    client = cluster["client_env"]
    shared = cluster["shared"]

    # the cluster is on loopback only (DESIGN §3.8): nothing of it listens elsewhere
    listening = _listening_addresses(_marked_pids(cluster["mark"]))
    assert cluster["dashboard"] in {port for _, port in listening}, sorted(listening)
    assert all(_is_loopback(a) for a, _ in listening), sorted(listening)

    # the working dir: a copy of the checkout, the tiny sweep, and what .gitignore keeps
    # home (a laptop's ./sweeps and mlflow.db) which must not be uploaded
    wd = tmp_path / "checkout"
    _copy_checkout(wd)
    (wd / "search_spaces" / f"{SWEEP}.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    (wd / "sweeps" / "old").mkdir(parents=True)
    (wd / "sweeps" / "old" / "marker").write_text("a laptop's sweep")
    (wd / "mlflow.db").write_text("not a database")
    (wd / ".git").mkdir()  # the repository's history stays home too (Ray 2.60 leaves it)
    (wd / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    # which code the job runs: the uploaded copy must come before the installed package
    with (wd / "sweep" / "cli.py").open("a") as f:
        f.write('\nprint(f"[test] sweep.cli from {__file__}", file=sys.stderr, flush=True)\n')
    submit = ["job", "submit", "--working-dir", ".", "--", "sweep", "run"]
    submit.append(f"search_spaces/{SWEEP}.yaml")

    # token authentication is really on: a client without the token, or with a wrong one, is
    # refused before anything runs
    empty_home = tmp_path / "home"
    empty_home.mkdir()
    no_token = {
        k: v for k, v in client.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")
    }
    no_token["HOME"] = str(empty_home)  # no ~/.ray/auth_token either
    status = _http_status(cluster["dashboard"], "/api/jobs/", token=None)  # the server's word
    assert status == 401, f"the job API answered {status} without a token: auth is off"
    r = _ray(["job", "list"], env=no_token)
    assert r.returncode != 0, _out(r)
    assert "Authentication required" in r.stderr, _out(r)
    assert "Unauthorized: Missing authentication token" in r.stderr, _out(r)
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    r = _ray(submit, env={**client, "RAY_AUTH_TOKEN_PATH": str(wrong)}, cwd=wd)
    assert r.returncode != 0, _out(r)
    assert "Authentication failed" in r.stderr, _out(r)
    assert "Forbidden: Invalid authentication token" in r.stderr, _out(r)

    # the documented submission, waited for as `ray job submit` does without --no-wait
    t0 = time.monotonic()
    r = _ray(submit, env=client, cwd=wd, timeout=420)
    took = time.monotonic() - t0
    assert r.returncode == 0, _out(r)
    job = re.search(r"raysubmit_\w+", r.stdout + r.stderr)
    assert job, _out(r)
    job = job.group(0)

    r = _ray(["job", "status", job], env=client)
    assert r.returncode == 0 and f"Job '{job}' succeeded" in r.stdout, _out(r)
    r = _ray(["job", "list"], env=client)
    assert r.returncode == 0, _out(r)
    assert r.stdout.count("submission_id='raysubmit_") == 1, _out(r)  # the refused one is not
    assert "JobStatus.SUCCEEDED" in r.stdout, _out(r)
    r = _ray(["job", "logs", job], env=client)
    assert r.returncode == 0, _out(r)
    logs = r.stdout
    assert f"sweep {SWEEP} finished: {TRIALS} trials, 0 failed" in logs, logs[-6000:]

    # the head's node id, from the cluster itself (what `ray list nodes` shows)
    nodes = _get_json(cluster["dashboard"], "/api/v0/nodes", cluster["token"].read_text())
    nodes = nodes["data"]["result"]["result"]
    assert len(nodes) == 1 and nodes[0]["is_head_node"], nodes
    head_id = nodes[0]["node_id"]

    # checkpoints under KDSWEEP_STORAGE, teachers under KDSWEEP_TEACHERS
    sweep_dir = shared / "sweeps" / SWEEP
    states = sorted(p.relative_to(sweep_dir) for p in sweep_dir.glob("trials/*/*/state.pt"))
    assert [p.parts[1] for p in states] == [cell_folder(CELL)] * TRIALS, (
        f"no trial checkpoints under $KDSWEEP_STORAGE ({shared / 'sweeps'}): {states}"
    )
    assert (sweep_dir / "tune").is_dir()
    assert any(p.is_file() for p in (shared / "teachers").rglob("*"))
    assert not (sweep_dir / "optuna.db").exists()  # KDSWEEP_OPTUNA, not the default

    # one FINISHED MLflow student run per trial, each run on the cluster's head node
    from mlflow.tracking import MlflowClient

    ml = MlflowClient(tracking_uri=f"sqlite:///{shared / 'mlflow.db'}")
    exp = ml.get_experiment_by_name(SWEEP)
    assert exp is not None
    runs = ml.search_runs([exp.experiment_id], filter_string="tags.kind = 'student'")
    assert len(runs) == TRIALS, runs
    assert {x.info.status for x in runs} == {"FINISHED"}
    assert {x.data.tags.get("ray_node_id") for x in runs} == {head_id}
    assert all(x.info.artifact_uri.startswith((shared / "mlartifacts").as_uri()) for x in runs)

    # the Optuna study in KDSWEEP_OPTUNA
    import optuna

    study = optuna.load_study(
        study_name=f"{SWEEP}/{CELL}", storage=f"sqlite:///{shared / 'optuna.db'}"
    )
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * TRIALS

    # what Ray uploaded: the code and the sweep file; not what .gitignore ignores. And the job
    # wrote nothing into it: everything went to the shared places.
    resources = cluster["temp_dir"] / "session_latest" / "runtime_resources"
    unpacked = [p for p in resources.glob("working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert len(unpacked) == 1, unpacked
    unpacked = unpacked[0].resolve()  # session_latest is a link to the session's folder
    assert (unpacked / "sweep" / "cli.py").is_file()
    assert (unpacked / "search_spaces" / f"{SWEEP}.yaml").is_file()
    left_in_job_dir = [p.name for p in unpacked.iterdir() if p.name in SHARED_NAMES | {".git"}]
    assert not left_in_job_dir, (
        f"{left_in_job_dir} in the job's working dir {unpacked}: uploaded although .gitignore "
        f"ignores them (or .git), or written there by the sweep instead of to the shared storage"
    )

    ran = re.search(r"\[test\] sweep\.cli from (\S+)", logs)
    assert ran and Path(ran.group(1)).resolve().is_relative_to(unpacked), logs[-6000:]

    # the driver said where its storage came from
    for var in ("KDSWEEP_STORAGE", "KDSWEEP_TEACHERS", "KDSWEEP_OPTUNA", "MLFLOW_TRACKING_URI"):
        assert f"from ${var}" in logs, logs[-6000:]
    print(f"job {job}: {took:.1f} s from `ray job submit` to its end")
