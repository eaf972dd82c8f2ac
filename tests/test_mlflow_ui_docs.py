"""The README's "Comparing runs in the MLflow UI", checked against a real MLflow store.

A tiny real sweep named `quickstart` (the quickstart's grid, ce and mse x kd and ard x pgd, one
trial per cell, 2 epochs, 60 validation and test examples) runs once through the CLI into
`mlflow.db` in a temporary folder. Every filter of the section's `text` block goes through
`MlflowClient.search_runs` and must return exactly the runs its comment in the README says;
the section's Python block is run as written there. The UI's search box sends its text to the
same search (`/ajax-api/2.0/mlflow/runs/search`, see test_report.py), unchanged.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import sweep_cli, tiny_spec_dict
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service import utils as tracking_utils
from mlflow.utils.search_utils import SearchUtils

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Comparing runs in the MLflow UI"
EPOCHS = 2


def _section() -> str:
    text = README.read_text()
    assert HEADING + "\n" in text, f"README has no section {HEADING!r}"
    body = text.split(HEADING + "\n", 1)[1]
    return re.split(r"^## ", body, maxsplit=1, flags=re.M)[0]


def _block(lang: str) -> str:
    """The section's one fenced block of language `lang`."""
    blocks = re.findall(rf"^```{lang}\n(.*?)^```$", _section(), flags=re.S | re.M)
    assert len(blocks) == 1, f"expected one ```{lang} block in the section, found {len(blocks)}"
    return blocks[0]


def readme_filters() -> list[str]:
    """The filters the section shows: the `text` block's lines, less `#` comments."""
    lines = [ln.strip() for ln in _block("text").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


# --- what each filter returns, in the README's own words (independently of MLflow) ------------
def _tag(r, key: str) -> str | None:
    return r.data.tags.get(key)


def _student(r) -> bool:
    return _tag(r, "kind") == "student"


def _robust_above(r, t: float = 0.5) -> bool:
    return _student(r) and r.data.metrics.get("test/robust_acc/pgd20", float("-inf")) > t


EXPECTED = {
    'tags.kind = "student"': _student,
    'tags.kind = "teacher"': lambda r: _tag(r, "kind") == "teacher",
    'tags.method = "ard"': lambda r: _student(r) and _tag(r, "method") == "ard",
    'tags.cell = "mse.ard.pgd"': lambda r: (
        _student(r) and r.info.run_name.startswith("mse.ard.pgd#")
    ),
    'tags.kind = "student" and tags.teacher_loss = "mse"': lambda r: (
        _student(r) and _tag(r, "teacher_loss") == "mse"
    ),
    'attributes.run_name LIKE "ce.%"': lambda r: _student(r) and _tag(r, "teacher_loss") == "ce",
    'tags.kind = "student" and metrics.`test/robust_acc/pgd20` > 0.5': _robust_above,
    'params.eps = "0.1"': lambda r: _student(r) and float(r.data.params["eps"]) == 0.1,
}
# Numeric thresholds: a tiny sweep's accuracies say nothing about 0.5, so such a filter is also
# run with its threshold moved to each value the sweep produced, which must split the runs.
THRESHOLD = re.compile(r"(?P<key>metrics\.\S+)\s*(?P<op>>=|<=|>|<)\s*(?P<value>[0-9.]+)")
# Written in the section as rejected, with (part of) MLflow's message.
REJECTED = {
    "metrics.test/robust_acc/pgd20 > 0.5": "Invalid comparison clause",
    'params.temperature > "2"': "Invalid comparator '>'",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The tiny `quickstart` sweep, run once through the CLI; its MLflow runs."""
    tmp = tmp_path_factory.mktemp("uidocs")
    spec = tiny_spec_dict(
        tmp,
        name="quickstart",
        teacher={"epochs": 1},
        grid={"teacher_loss": ["ce", "mse"], "method": ["kd", "ard"], "train_attack": ["pgd"]},
        budget={"trials_per_cell": 1, "epochs": EPOCHS, "grace_period": EPOCHS},
        evaluation={
            "attacks": ["fgsm", "pgd20"],
            "val_attack": "pgd2",
            "val_examples": 60,
            "test_examples": 60,
        },
    )
    spec["storage"]["mlflow_tracking_uri"] = "sqlite:///mlflow.db"  # as the README's snippet
    (tmp / "quickstart.yaml").write_text(yaml.safe_dump(spec))
    r = sweep_cli(tmp, "run", "quickstart.yaml")  # storage from the file: no KDSWEEP_* there
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("quickstart").experiment_id
    runs = client.search_runs([exp_id], max_results=1000)
    kinds = sorted(_tag(r, "kind") for r in runs)
    assert kinds == ["student"] * 4 + ["sweep"] + ["teacher"] * 2, kinds
    assert all(r.info.status == "FINISHED" for r in runs if _student(r))
    assert len({r.info.run_name for r in runs}) == len(runs)  # failures name the runs

    def search(flt: str, **kw) -> list:
        return client.search_runs([exp_id], flt, max_results=1000, **kw)

    return SimpleNamespace(tmp=tmp, client=client, exp_id=exp_id, runs=runs, search=search)


def _ids(runs) -> set[str]:
    return {r.info.run_id for r in runs}


def _names(runs) -> list[str]:
    return sorted(r.info.run_name for r in runs)


def test_the_section_shows_exactly_the_filters_checked_here():
    shown = readme_filters()
    assert len(shown) == len(set(shown)), "a filter is shown twice"
    assert set(shown) == set(EXPECTED), (
        f"in the README only: {set(shown) - set(EXPECTED)}; "
        f"checked here only: {set(EXPECTED) - set(shown)}"
    )


@pytest.mark.parametrize("flt", readme_filters())
def test_each_filter_returns_the_runs_the_readme_says(store, flt):
    got = _names(store.search(flt))  # what the UI's search box gets for this text
    every = {"metric": set(), "parameter": set(), "tag": set()}
    for r in store.runs:
        every["metric"] |= set(r.data.metrics)
        every["parameter"] |= set(r.data.params)
        every["tag"] |= set(r.data.tags)
    for clause in SearchUtils.parse_search_filter(flt):  # MLflow's own reading of the names
        if clause["type"] in every:
            assert clause["key"] in every[clause["type"]], f"{flt}: no run has {clause['key']!r}"
    assert flt in EXPECTED, f"{flt}: shown in the README, no expectation here"
    pred = EXPECTED[flt]
    assert got == _names(r for r in store.runs if pred(r)), flt
    m = THRESHOLD.search(flt)
    if m is None:  # the filter picks some runs and leaves others
        assert 0 < sum(map(pred, store.runs)) < len(store.runs), flt
        return
    key = SearchUtils.parse_search_filter(m.group(0))[0]["key"]
    values = sorted({r.data.metrics[key] for r in store.runs if _student(r)})
    assert len(values) > 1, f"{key}: the tiny sweep gave every trial the same value"
    for v in values:
        variant = flt[: m.start("value")] + repr(v) + flt[m.end("value") :]
        want = _names(r for r in store.runs if pred(r, t=v))
        assert _names(store.search(variant)) == want, variant
    assert 0 < sum(pred(r, t=values[0]) for r in store.runs) < len(store.runs)


def test_the_reasons_given_in_the_comments_hold(store):
    teachers = [r for r in store.runs if _tag(r, "kind") == "teacher"]
    # "teacher runs carry teacher_loss too, so keep kind"
    assert any(_tag(r, "kind") == "teacher" for r in store.search('tags.teacher_loss = "mse"'))
    # "teacher runs have test/... metrics too"
    assert all("test/robust_acc/pgd20" in r.data.metrics for r in teachers)
    # "run names are <cell>#<k>"
    for r in store.runs:
        if _student(r):
            assert re.fullmatch(r"[a-z_]+\.[a-z_]+\.[a-z_]+#\d+", r.info.run_name)
            assert r.info.run_name.split("#")[0] == _tag(r, "cell")
    # "the trials are nested under the sweep's parent run"
    (parent,) = store.search('tags.kind = "sweep"')
    for r in store.runs:
        if _student(r):
            assert _tag(r, "mlflow.parentRunId") == parent.info.run_id


def test_what_the_section_says_is_rejected_is_rejected(store):
    section = _section()
    for flt, message in REJECTED.items():
        assert f"`{flt}`" in section, f"the README no longer shows {flt!r}"
        with pytest.raises(MlflowException, match=re.escape(message)):
            store.search(flt)
    with pytest.raises(MlflowException):  # "there is no `or`"
        store.search('tags.method = "kd" or tags.method = "ard"')
    with pytest.raises(MlflowException):  # unquoted in an ordering, too
        store.search('tags.kind = "student"', order_by=["metrics.val/robust_acc DESC"])
    # "(or double quotes)"
    for name in ('"test/robust_acc/pgd20"', "`test/robust_acc/pgd20`"):
        flt = f'tags.kind = "student" and metrics.{name} > 0'
        assert _ids(store.search(flt)) == _ids(r for r in store.runs if _robust_above(r, t=0))


def test_metrics_are_the_last_epoch_logged_at_step_epoch(store):
    """A metric in the table and in filters is its last logged value; epoch e is step e."""
    for r in store.runs:
        if not _student(r):
            continue
        history = store.client.get_metric_history(r.info.run_id, "val/robust_acc")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
        last = max(history, key=lambda m: m.step)
        assert r.data.metrics["val/robust_acc"] == last.value


def test_the_python_snippet_runs_as_written(store, monkeypatch):
    code = _block("python")
    monkeypatch.chdir(store.tmp)  # where the sweep's mlflow.db is, as for a reader
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    scope: dict = {}
    # set_tracking_uri is global and exports MLFLOW_TRACKING_URI: undone afterwards, so that no
    # later test (or `sweep run` it starts) logs to this store
    with tracking_utils._use_tracking_uri(tracking_utils._tracking_uri):
        exec(compile(code, "README.md", "exec"), scope)  # its last line selects columns
    assert "MLFLOW_TRACKING_URI" not in os.environ
    runs = scope["runs"]
    flt = re.search(r"filter_string=('[^']*')", code).group(1)
    assert set(runs["run_id"]) == _ids(store.search(ast.literal_eval(flt)))
    ard = {r.info.run_id for r in store.runs if _student(r) and _tag(r, "method") == "ard"}
    assert set(runs["run_id"]) == ard
    values = list(runs["metrics.val/robust_acc"])
    assert values == sorted(values, reverse=True)

    # the snippet's ordering, on every trial (the ard trials alone may tie)
    (order_by,) = re.findall(r"order_by=(\[.*?\])", code)
    ordered = store.search('tags.kind = "student"', order_by=ast.literal_eval(order_by))
    values = [r.data.metrics["val/robust_acc"] for r in ordered]
    assert len(set(values)) > 1 and values == sorted(values, reverse=True), values
