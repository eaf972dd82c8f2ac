"""`sweep dashboard`: optuna-dashboard on a sweep's Optuna storage, on loopback unless told.

Every cell of a sweep is one study, `<sweep>/<cell>`, in the one storage state.json names
(`optuna.db` in the sweep's folder, or `storage.optuna`, e.g. PostgreSQL). The dashboard is
served read-only: a study deleted or a trial told from the browser would change what the
sweep's searcher finds in its storage. It has no authentication, so it listens on 127.0.0.1
unless `--host` says otherwise (with a warning). A storage URL is never printed with its
password.
"""

from __future__ import annotations

import errno
import ipaddress
import signal
import socket
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .credentials import redact, scrub
from .layout import open_sweep

READ_ONLY = ("GET", "HEAD")


class DashboardError(Exception):
    """A problem `sweep dashboard` reports in one line (never holding a password)."""


def _clean(message: str, url: str) -> str:
    """The first line of an error message, the storage's password (should it appear) hidden."""
    return scrub((message.strip().splitlines() or [""])[0], url)


def open_storage(url: str) -> Any:
    """The sweep's Optuna storage, checked readable; DashboardError if not.

    A missing SQLite file is not created (the sweep's searcher creates it with its first
    study); a storage is opened as optuna-dashboard opens one (no table creation, no schema
    version check)."""
    import optuna

    if url.startswith("sqlite:"):
        from sqlalchemy.engine import make_url

        path = make_url(url).database
        if path and path != ":memory:" and not Path(path).exists():
            raise DashboardError(
                f"no Optuna storage yet at {url}: the sweep creates it when its first trial "
                "starts (after its teachers); try again then"
            )
    try:
        storage = optuna.storages.RDBStorage(
            url, skip_compatibility_check=True, skip_table_creation=True
        )
        storage.get_all_studies()
    except Exception as e:  # a driver missing, the server down, a wrong password, no tables
        raise DashboardError(
            f"cannot read the Optuna storage {redact(url)}: {type(e).__name__}: {_clean(str(e), url)}"
        ) from None
    return storage


def read_only(app: Callable) -> Callable:
    """`app` answering GET and HEAD only; anything else (delete a study, tell a trial, save a
    note) gets 405."""

    def wrapped(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD", "GET").upper() in READ_ONLY:
            return app(environ, start_response)
        body = b'{"reason": "sweep dashboard is read-only"}'
        start_response(
            "405 Method Not Allowed",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Allow", ", ".join(READ_ONLY)),
            ],
        )
        return [body]

    return wrapped


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no line per request
        pass


def listen(app: Callable, host: str, port: int) -> WSGIServer:
    """A threaded WSGI server bound to host:port; DashboardError if it cannot be."""

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True  # a request in flight does not hold up the exit
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    if not 0 <= port <= 65535:
        raise DashboardError(f"--port {port}: a port is 0 to 65535")
    try:
        return make_server(host, port, app, server_class=Server, handler_class=_QuietHandler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise DashboardError(
                f"port {port} is in use on {host}; give another, e.g. --port {port + 1}"
            ) from None
        raise DashboardError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def url_of(host: str, port: int) -> str:
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/dashboard"


def serve_forever(httpd: WSGIServer) -> None:
    """Serve until Ctrl-C (SIGINT) or SIGTERM, then close the socket."""

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        httpd.server_close()


def dashboard(name: str, storage: str, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve optuna-dashboard on sweep `name`'s Optuna storage until stopped.
    FileNotFoundError: no such sweep; DashboardError: the storage or the port."""
    from optuna_dashboard import wsgi

    opened = open_sweep(name, storage)
    url = opened.layout.optuna_url
    optuna_storage = open_storage(url)
    names = [s.study_name for s in optuna_storage.get_all_studies()]
    cells = [c.key for c in opened.spec.cells()]
    mine = {opened.layout.study_name(c) for c in cells} & set(names)
    others = [n for n in names if not n.startswith(f"{name}/")]
    httpd = listen(read_only(wsgi(optuna_storage)), host, port)
    if not is_loopback(host):
        print(
            f"warning: listening on {host}: the dashboard has no authentication; anyone who "
            "can reach this port sees the sweep's studies",
            file=sys.stderr,
            flush=True,
        )
    also = f" (and {len(others)} of other sweeps)" if others else ""
    print(
        f"sweep {name}: {len(mine)} of {len(cells)} cells have a study, named {name}/<cell>, "
        f"in {redact(url)}{also}\n"
        f"optuna-dashboard (read-only): {url_of(host, httpd.server_port)}\n"
        "stop it with Ctrl-C",
        flush=True,
    )
    serve_forever(httpd)
