"""Passwords inside storage URLs: the one home for hiding them and for getting them back.

Why: `storage.optuna` and `storage.mlflow_tracking_uri` may be written with a password
(`postgresql://u:pw@db/optuna`, `http://u:pw@mlflow:5000`, `...?password=pw`). Whatever kdsweep
writes or prints (sweep.yaml, logged as an artifact on every run; state.json; hints; `sweep
status`; the `cache_location` tag) holds the URL with its password as `***`. The driver still
*uses* the real URL: on `sweep run` it has it from the file or the environment; on resume (and
status, report, evaluate), `real_url` takes it from the environment again.

A password belongs in the environment, not in a file: $KDSWEEP_OPTUNA / $MLFLOW_TRACKING_URI
with the whole URL (spec.STORAGE_ENV), or the clients' own variables: PostgreSQL reads
$PGPASSWORD (or ~/.pgpass), MLflow reads $MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from typing import TypeVar
from urllib.parse import unquote

MASK = "***"
_QUERY_PASSWORD = re.compile(r"(?i)(\bpassword=)([^&]*)")
# the storage fields that may hold a password, and the variable that may hold the whole URL
URL_FIELDS = {"optuna": "KDSWEEP_OPTUNA", "mlflow_tracking_uri": "MLFLOW_TRACKING_URI"}
# where a password belongs instead (named by the warning)
PASSWORD_ENV = {
    "optuna": "$KDSWEEP_OPTUNA (the whole URL) or $PGPASSWORD / ~/.pgpass",
    "mlflow_tracking_uri": "$MLFLOW_TRACKING_URI (the whole URL) or $MLFLOW_TRACKING_PASSWORD",
}

M = TypeVar("M")


def redact(url: str) -> str:
    """`url` with its password (`user:PASSWORD@host`, `?password=...`), if any, as `***`.

    Everything from the first `:` after the user to the last `@` counts as the password, so a
    password holding an unencoded `@` or `/` is hidden whole (sqlite URLs hold no credentials,
    and a path may hold an `@`)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.startswith("sqlite"):
        return url
    userinfo, at, host = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:{MASK}@{host}"
    return f"{scheme}://" + _QUERY_PASSWORD.sub(rf"\g<1>{MASK}", rest)


def has_password(url: str | None) -> bool:
    return bool(url) and redact(url) != url


def passwords(url: str) -> list[str]:
    """The secrets `redact` hides, as written and percent-decoded (to scrub error messages)."""
    scheme, _, rest = url.partition("://")
    found = [m.group(2) for m in _QUERY_PASSWORD.finditer(rest)]
    userinfo, at, _ = rest.rpartition("@")
    if at and ":" in userinfo and not scheme.startswith("sqlite"):
        found.append(userinfo.split(":", 1)[1])
    return [s for p in found if p for s in {p, unquote(p)}]


def scrub(text: str, url: str) -> str:
    """`text` with `url`'s password, wherever it appears, as `***`."""
    for secret in passwords(url):
        text = text.replace(secret, MASK)
    return text.replace(url, redact(url))


def redact_storage(storage: M) -> M:
    """A copy of a StorageSpec with its URL fields redacted (what is written or pickled)."""
    update = {f: redact(v) for f in URL_FIELDS if (v := getattr(storage, f, None))}
    return storage.model_copy(update=update)  # type: ignore[attr-defined]


def redact_spec(spec: M) -> M:
    """A copy of a SweepSpec with its storage URLs redacted (what is written or pickled)."""
    return spec.model_copy(update={"storage": redact_storage(spec.storage)})  # type: ignore[attr-defined]


def mlflow_client_uri(uri: str, environ: MutableMapping[str, str] | None = None) -> str:
    """The tracking URI to give MLflow's client: an http(s) URI's `user:password@` moved into
    the variables MLflow reads its basic-auth credentials from (MLFLOW_TRACKING_USERNAME,
    MLFLOW_TRACKING_PASSWORD; ones already set win), so nothing MLflow prints (its run links,
    its request errors) holds the password."""
    scheme, sep, rest = uri.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not (sep and scheme in ("http", "https") and at and "/" not in userinfo):
        return uri
    user, _, password = userinfo.partition(":")
    if not password:  # a user name alone is no secret: left where it is
        return uri
    environ = os.environ if environ is None else environ
    environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(user))
    environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(password))
    return f"{scheme}://{host}"


def real_url(stored: str, field: str, environ: dict[str, str] | None = None) -> str:
    """The URL to connect with, from the redacted one a sweep stored (state.json).

    The environment's URL ($KDSWEEP_OPTUNA, $MLFLOW_TRACKING_URI) when it is the stored one
    with its password; else the stored one without the masked password, for the client to
    take it from its own variables ($PGPASSWORD, ~/.pgpass, $MLFLOW_TRACKING_PASSWORD)."""
    if MASK not in stored:
        return stored
    environ = os.environ if environ is None else environ
    given = environ.get(URL_FIELDS[field], "")
    if given and redact(given) == stored:
        return given
    scheme, _, rest = stored.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if at and userinfo.endswith(f":{MASK}"):
        rest = f"{userinfo[: -len(MASK) - 1]}@{host}"
    rest = re.sub(rf"(?i)[?&]password={re.escape(MASK)}(?=&|$)", "", rest)
    if "?" not in rest and "&" in rest:  # the password was the first query parameter
        rest = rest.replace("&", "?", 1)
    return f"{scheme}://{rest}"


def inline_password_warnings(storage: object, environ: dict[str, str] | None = None) -> list[str]:
    """One line per storage URL that came from the file with a password in it."""
    environ = os.environ if environ is None else environ
    out = []
    for field, var in URL_FIELDS.items():
        url = getattr(storage, field, None)
        if has_password(url) and not environ.get(var):
            out.append(
                f"warning: storage.{field} holds a password ({redact(url)}); kdsweep never "
                f"writes it, but it belongs in the environment: {PASSWORD_ENV[field]}"
            )
    return out
