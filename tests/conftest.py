"""Shared test helpers and fixtures. Ray stays on loopback (DESIGN §3.8).

- `tiny_spec_dict(tmp_path, **over)`: a sweep file small enough for a test.
- `make_context(tmp_path, ...)`, `trial_config(...)` and `runs_of(ctx, kind)`: one trial in
  plain Python (no Ray) against a real MLflow SQLite store, and the runs it left there.
- `sweep_cli(cwd, *args)`: the `sweep` command run to its end; `start_sweep_cli(...)`: the same
  in the background, to be signalled (`stop_group`), with `wait_until` to watch it.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch import nn

if TYPE_CHECKING:
    from sweep.config import TrialConfig
    from sweep.context import SweepContext
    from sweep.spec import SweepSpec

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
torch.set_num_threads(1)


# --- the CLI, as a user runs it -----------------------------------------------------------------
SWEEP = [sys.executable, "-m", "sweep.cli"]  # `sweep`, of this interpreter
# they override a sweep file's storage (spec.STORAGE_ENV): a test's file must not be overridden
# by the shell the tests run from
STORAGE_ENV = ("KDSWEEP_STORAGE", "KDSWEEP_TEACHERS", "KDSWEEP_OPTUNA", "MLFLOW_TRACKING_URI")


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment `sweep` runs in under test: an embedded Ray on loopback (no
    RAY_ADDRESS), unbuffered output, storage from the sweep file only, then `env` on top."""
    out = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
    for var in ("RAY_ADDRESS", *STORAGE_ENV):
        out.pop(var, None)
    return out | (env or {})


def sweep_cli(
    cwd, *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`sweep ARGS` as a user runs it, in `cwd`, to its end (see cli_env; `env` on top)."""
    return subprocess.run(
        SWEEP + list(args),
        cwd=cwd,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sweep_ok(cwd, *args: str, **kw: Any) -> str:
    """`sweep ARGS` (sweep_cli) that must succeed; its stdout."""
    out = sweep_cli(cwd, *args, **kw)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def start_sweep_cli(
    cwd, *args: str, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`sweep ARGS` in the background, for a test that watches or signals it, its output
    (stdout and stderr) going to `log`. Its own session (process group), so that it and the
    Ray processes it starts can be stopped as a whole (stop_group)."""
    with log.open("w") as out:  # the child keeps its own copy
        return subprocess.Popen(
            SWEEP + list(args),
            cwd=cwd,
            env=cli_env(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_group(proc: subprocess.Popen, grace: float = 0.0) -> None:
    """Stop a process started in its own session and whatever is left of its group (a killed
    driver's Ray processes, a server's workers): SIGTERM first if it runs and `grace` > 0
    seconds are given, then SIGKILL. A no-op for a group already gone."""
    if grace and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_until(
    what: str,
    condition: Callable[[], Any],
    proc: subprocess.Popen,
    log: Path,
    timeout: float = 300,
) -> Any:
    """Poll `condition` until it gives something true, and return that; fail the test (with
    the end of `log`) if `proc` exits first or `timeout` seconds pass (stopping `proc`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"sweep exited ({proc.returncode}) before {what}:\n{log.read_text()}")
        time.sleep(0.25)
    stop_group(proc)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-5000:]}")


def tiny_spec_dict(tmp_path, **over):
    """A sweep small enough for a test: 2 teacher losses x 2 methods, 2 trials, 2 epochs."""
    spec = {
        "name": "tiny",
        "seed": 0,
        "dataset": {"name": "digits"},
        "teacher": {"epochs": 2},
        "grid": {"teacher_loss": ["ce", "mse"], "method": ["kd", "ard"], "train_attack": ["pgd"]},
        "threat": {"eps": 0.1},
        "train_attack": {"pgd": {"steps": 2}},
        "search_space": {
            "temperature": {"type": "float", "low": 1.0, "high": 4.0},
            "alpha": {"type": "float", "low": 0.2, "high": 0.8},
        },
        "budget": {"trials_per_cell": 2, "epochs": 2, "grace_period": 2},
        "evaluation": {
            "attacks": ["fgsm", "pgd20"],
            "val_attack": "pgd5",
            "val_examples": 100,
            "test_examples": 100,
        },
        "resources": {"cpus_per_trial": 1},
        "storage": {
            "path": str(tmp_path / "sweeps"),
            "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        },
    }
    for k, v in over.items():
        spec[k] = v
    return spec


@pytest.fixture
def tiny_spec(tmp_path):
    return tiny_spec_dict(tmp_path)


# --- one trial in plain Python ------------------------------------------------------------------
def make_context(
    tmp_path: Path, spec: SweepSpec | None = None, *, experiment: str = "t", **over: Any
) -> SweepContext:
    """What the driver hands every trial, for a trial run without Ray: the sweep folder is
    `tmp_path/sweep`, the teacher cache `tmp_path/teachers`, Optuna and MLflow are SQLite files
    in `tmp_path` (the MLflow experiment `experiment` is created). `spec` defaults to the tiny
    sweep with `over` (see tiny_spec_dict)."""
    from sweep.context import SweepContext
    from sweep.layout import SweepLayout
    from sweep.spec import parse_spec
    from sweep.tracking import Tracker

    if spec is None:
        spec = parse_spec(tiny_spec_dict(tmp_path, **over))
    elif over:
        raise TypeError("give a spec or tiny_spec_dict overrides, not both")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(uri, experiment)
    layout = SweepLayout(
        str(tmp_path), "sweep", str(tmp_path / "teachers"), f"sqlite:///{tmp_path}/optuna.db"
    )
    return SweepContext(spec, layout, uri, experiment, None)


def trial_config(cell: str = "ce.kd.pgd", **over: Any) -> TrialConfig:
    """The configuration the searcher hands a trial of `cell` (`<teacher_loss>.<method>.
    <train_attack>`): by default KD at temperature 2 and alpha 0.5, seed 0, Optuna trial 0;
    `over` sets any other field (hp, seed, number, repeat, trial_id)."""
    from sweep.config import TrialConfig

    teacher_loss, method, train_attack = cell.rsplit(".", 2)
    fields = {"hp": {"temperature": 2.0, "alpha": 0.5}, "seed": 0, "number": 0} | over
    return TrialConfig(cell, teacher_loss, method, train_attack, **fields)


def runs_of(ctx: SweepContext, kind: str = "student") -> list:
    """The MLflow runs of one kind (student, teacher, sweep) of the context's sweep."""
    return ctx.tracker().sweep_runs(ctx.spec.name, kind)


class LinearLogits(nn.Module):
    """A 'network' whose logits are a known linear map of the input, so formulas (and which of
    x or x' a loss feeds to which network) can be checked by hand."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w


def py_softmax(row: list[float], temp: float = 1.0) -> list[float]:
    """softmax(row / temp) in plain Python floats: hand computations independent of torch."""
    z = [v / temp for v in row]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def py_kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) of two probability lists, in plain Python floats (0 * log 0 = 0)."""
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True) if a > 0)


class Recorder(nn.Module):
    """Wraps a model and keeps every input it is called on: an attack's target and iterates."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.inner(x)


# --- servers on loopback: MLflow tracking, S3 (moto) ---------------------------------------------
def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(tmp: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on loopback: SQLite backend, artifacts proxied into `tmp/artifacts`."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", f"sqlite:///{tmp / 'server.db'}", "--workers", "1"]
    cmd += ["--artifacts-destination", str(tmp / "artifacts"), "--serve-artifacts"]
    with open(tmp / "server.log", "w") as log:
        # its own process group: its workers are stopped with it
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_mlflow_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until the server at `url` answers /health (AssertionError if it exits or never does)."""
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow server not up after {timeout}s:\n{log.read_text()[-3000:]}")


S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@contextmanager
def moto_s3(log: Path, bucket: str) -> Iterator[tuple[dict[str, str], Any]]:
    """moto's S3 server on loopback with `bucket` in it: the environment a cluster node would
    have (endpoint and credentials) and a boto3 client; the server is stopped after."""
    import boto3

    port = free_port()
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", **S3_CREDENTIALS}
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )

    def created() -> bool:
        try:
            client.create_bucket(Bucket=bucket)
            return True
        except Exception:
            return False

    try:
        wait_until("moto's S3 server", created, server, log, timeout=30)
        yield env, client
    finally:
        server.kill()
        server.wait(timeout=10)
