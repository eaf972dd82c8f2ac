"""Whether a sweep's stores and data can be reached, checked before any trial starts.

Why a module of its own: the sweep file's schema (spec.py) says what a valid file is and never
touches the network or the disk; these checks do, with short timeouts, so that an unreachable
database, a malformed tracking URI, a bucket that does not exist or a missing dataset is refused
by `sweep validate` and by `sweep run` before Ray starts (not by the first trial, after it).

What is checked is reachability (the name resolves, the port answers, the bucket exists, the
folder is there), not credentials: those are the stores' own business when the sweep connects.
No Optuna or MLflow import: both are slow to import and neither has a connect timeout to lend.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from .credentials import redact
from .data import DATASETS
from .spec import SpecError, SweepSpec
from .store import URI_SCHEMES, absolute, is_remote

TIMEOUT_S = 3.0  # per connection attempt: a store farther away than this is down for a sweep

# Optuna's RDBStorage: the SQLAlchemy dialects it supports, their default port and driver
OPTUNA_DIALECTS = {"sqlite": None, "postgresql": 5432, "mysql": 3306}
DRIVERS = {
    "postgresql": "psycopg2",
    "postgresql+psycopg2": "psycopg2",
    "postgresql+psycopg": "psycopg",
    "postgresql+pg8000": "pg8000",
    "mysql": "MySQLdb",
    "mysql+mysqldb": "MySQLdb",
    "mysql+pymysql": "pymysql",
}
# MLflow 3's tracking stores (a file store is refused by MLflow 3 itself) and default ports
MLFLOW_SCHEMES = {
    "sqlite": None,
    "postgresql": 5432,
    "mysql": 3306,
    "mssql": 1433,
    "http": 80,
    "https": 443,
    "databricks": None,
}


def _reach(host: str, port: int) -> str | None:
    """None when a TCP connection to host:port opens within TIMEOUT_S, else why not."""
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            return None
    except socket.gaierror as e:
        return f"cannot resolve host {host!r} ({e.strerror})"
    except OSError as e:
        return f"cannot connect to {host}:{port} ({e.strerror or type(e).__name__})"


def _server(url: str, default_port: int | None) -> str | None:
    """A network URL's server reachable, or why not."""
    if default_port is None:
        return None
    try:
        parts = urlsplit(url)
        port = parts.port or default_port
    except ValueError as e:
        return f"not a URL ({e})"
    if not parts.hostname:
        return "names no host"
    return _reach(parts.hostname, port)


def optuna_problem(url: str) -> str | None:
    """Optuna's storage URL: a known dialect, its driver installed, its server answering."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    dialect = scheme.split("+", 1)[0]
    if dialect not in OPTUNA_DIALECTS:
        return f"{redact(url)!r} is not a database URL Optuna can use; allowed: " + ", ".join(
            f"{d}://..." for d in OPTUNA_DIALECTS
        )
    problem = _server(url, OPTUNA_DIALECTS[dialect])
    if problem:
        return f"{redact(url)!r}: {problem}; allowed: a database server that answers"
    driver = DRIVERS.get(scheme)
    if driver and importlib.util.find_spec(driver) is None:
        return f"{redact(url)!r} needs the Python package {driver!r}, which is not installed"
    return None


def tracking_problem(uri: str) -> str | None:
    """MLflow's tracking URI: a bare path (an SQLite file, tracking.resolve_tracking_uri) or a
    URI of a tracking store MLflow 3 knows, its server answering."""
    if "://" not in uri:
        if not uri or ":" in uri:
            return (
                f"{uri!r} is neither a path nor a URI; allowed: a path (an SQLite file) or "
                + ", ".join(f"{s}://..." for s in MLFLOW_SCHEMES)
            )
        return None
    scheme = uri.split("://", 1)[0].split("+", 1)[0]
    if scheme not in MLFLOW_SCHEMES:
        return (
            f"{redact(uri)!r}: unknown tracking store {scheme!r}; allowed: a path or "
            + ", ".join(f"{s}://..." for s in MLFLOW_SCHEMES)
        )
    problem = _server(uri, MLFLOW_SCHEMES[scheme])
    return (
        f"{redact(uri)!r}: {problem}; allowed: a tracking store that answers" if problem else None
    )


def location_problem(location: str) -> str | None:
    """A storage location (`storage.path`, `storage.teachers`, `--storage`): a folder, or a URI
    of a filesystem pyarrow knows whose bucket (the URI's first part) exists."""
    if not location:
        return "'' is empty; allowed: a folder or a URI"
    if "://" not in location:
        return None
    scheme = location.split("://", 1)[0]
    if scheme not in URI_SCHEMES:
        return (
            f"{location!r}: unknown filesystem {scheme!r}; allowed: a folder or a URI of "
            + ", ".join(f"{s}://" for s in URI_SCHEMES)
        )
    if not is_remote(location):
        return None
    bucket = absolute(location).split("://", 1)[1].split("/", 1)[0]
    try:
        if scheme == "s3":  # from_uri's client retries a dead endpoint for seconds on end
            fs: pafs.FileSystem = pafs.S3FileSystem(
                connect_timeout=TIMEOUT_S,
                request_timeout=TIMEOUT_S,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
                **_s3_endpoint(),
            )
        else:
            fs = pafs.FileSystem.from_uri(location)[0]
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except (OSError, ValueError) as e:
        return f"{location!r}: cannot reach its store ({str(e).splitlines()[0][:200]})"
    if not found:
        return f"{location!r}: bucket {bucket!r} does not exist; allowed: an existing bucket"
    return None


def _s3_endpoint() -> dict[str, str]:
    """The endpoint the environment names (as pyarrow's from_uri and the AWS SDK read it: a
    MinIO, a moto, a cluster's own S3), as S3FileSystem's arguments."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not url or "://" not in url:
        return {}
    scheme, host = url.split("://", 1)
    return {"scheme": scheme, "endpoint_override": host.rstrip("/")}


def data_problem(spec: SweepSpec) -> str | None:
    """A dataset that is not bundled must be in `data_dir`, or be downloaded there."""
    d = spec.dataset
    if DATASETS.get(d.name).bundled or d.download or Path(d.data_dir).expanduser().is_dir():
        return None
    return (
        f"{d.data_dir!r} does not exist, and download is false; allowed: the folder holding "
        f"{d.name}, or dataset.download: true"
    )


def check(spec: SweepSpec, file: str | None = None) -> None:
    """Every check above for one sweep; SpecError (naming the field) on the first failures.
    Environment overrides (spec.STORAGE_ENV) are already in `spec.storage`."""
    s = spec.storage
    problems: list[tuple[str, str]] = []
    for field, problem in (
        ("storage.path", location_problem(s.path)),
        ("storage.teachers", location_problem(s.teachers) if s.teachers else None),
        ("storage.optuna", optuna_problem(s.optuna) if s.optuna else None),
        ("storage.mlflow_tracking_uri", tracking_problem(s.mlflow_tracking_uri)),
        ("dataset.data_dir", data_problem(spec)),
    ):
        if problem:
            problems.append((field, problem))
    if problems:
        raise SpecError(file or f"sweep {spec.name}", problems)
