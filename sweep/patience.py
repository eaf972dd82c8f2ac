"""Store outages are a pause, not a crash: the one retry-with-backoff of kdsweep.

MLflow's client retries a few minutes, Optuna's storage not at all; past that, an outage of the
tracking server or the Optuna database would end the driver (or a trial) with a traceback and
leave runs RUNNING. Every call at those two boundaries (tracking.py's MLflow client, the Optuna
storages opened by `optuna_storage`) goes through `patiently`: a connection error waits (1 s,
doubling to WAIT_CAP_S) and tries again, as long as the store stays down, saying on the console
which store it waits for. Anything else (a bad request, a missing run) is raised at once.

Retrying is safe because the calls are idempotent or made so: MLflow dedupes an identical
metric (same key, step, value, timestamp), params and tags are set to the same values, and
tracking.py finds a run it created before a lost answer instead of creating a second.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

import optuna
import requests
import sqlalchemy.exc

from .credentials import redact

T = TypeVar("T")
FIRST_WAIT_S = 1.0
WAIT_CAP_S = 30.0  # the longest pause between tries: a store back is noticed within it
SAY_EVERY_S = 30.0  # how often a long wait is repeated on the console


def patiently(
    fn: Callable[[], T],
    store: str,
    is_outage: Callable[[BaseException], bool],
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    say: Callable[[str], None] = lambda line: print(line, flush=True),
) -> T:
    """fn(), tried again while it fails with an outage of `store` (named on the console as
    `MLflow at http://…`), however long that lasts; other errors are raised at once."""
    down_since = None
    said = 0.0
    wait = FIRST_WAIT_S
    while True:
        try:
            result = fn()
        except Exception as e:
            if not is_outage(e):
                raise
            now = clock()
            if down_since is None:
                down_since = now
            if now - said >= SAY_EVERY_S or said == 0.0:
                first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                say(f"waiting for {store} (down {now - down_since:.0f} s): {first}")
                said = now
            sleep(wait)
            wait = min(wait * 2, WAIT_CAP_S)
            continue
        if down_since is not None:
            say(f"{store} is back after {clock() - down_since:.0f} s")
        return result


def patient_methods(obj: T, store: str, is_outage: Callable[[BaseException], bool]) -> T:
    """`obj` with each public method retried through `patiently` (bound in its instance
    dictionary, so `obj` stays of its own class: Optuna checks what a storage is)."""
    for name in dir(obj):
        if name.startswith("_"):
            continue
        method = getattr(obj, name, None)
        if not callable(method) or isinstance(method, type):
            continue

        def retried(*args: Any, _m: Callable = method, **kwargs: Any) -> Any:
            return patiently(lambda: _m(*args, **kwargs), store, is_outage)

        functools.update_wrapper(retried, method)
        setattr(obj, name, retried)
    return obj


# --- Optuna ------------------------------------------------------------------------------------
def optuna_outage(e: BaseException) -> bool:
    """A lost or refused database connection (or a locked SQLite file), not a bad query."""
    seen: BaseException | None = e
    while seen is not None:  # Optuna wraps commit errors in StorageInternalError
        if isinstance(
            seen,
            sqlalchemy.exc.OperationalError
            | sqlalchemy.exc.InterfaceError
            | sqlalchemy.exc.DisconnectionError
            | requests.exceptions.ConnectionError,
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def optuna_storage(url: str, *, create: bool = True) -> optuna.storages.RDBStorage:
    """The sweep's Optuna storage, patient through outages. A server database gets
    `pool_pre_ping`: a connection that died while the database restarted is replaced, not
    handed to a query."""
    kwargs: dict[str, Any] = {} if url.startswith("sqlite") else {"pool_pre_ping": True}

    def open_it() -> optuna.storages.RDBStorage:
        return optuna.storages.RDBStorage(
            url, engine_kwargs=kwargs or None, skip_table_creation=not create
        )

    store = "the Optuna storage at " + redact(url)
    return patient_methods(patiently(open_it, store, optuna_outage), store, optuna_outage)
