"""summary.md says how each method and teacher loss was checked against its paper: a † on the
name of one that is not the paper's as published, in every table it appears in, and a footnote
with its fidelity (tag, meaning, source, departures) under the tables.

Fast: summary_markdown on a parsed spec with hand-made teacher runs and best configurations (the
report of real sweeps is tests/test_report.py). Fidelities are set per test, so these tests do
not move when a method's declared record changes.
"""

from __future__ import annotations

from math import nan
from types import SimpleNamespace

import pytest
from conftest import tiny_spec_dict

from sweep.fidelity import CHECKED_MEANING, Fidelity
from sweep.methods import METHODS
from sweep.report.data import SweepData
from sweep.report.footnotes import MARK, footnotes
from sweep.report.markdown import missing_lines, summary_markdown
from sweep.report.table import Best, trials_table
from sweep.spec import parse_spec
from sweep.teacher_losses import TEACHER_LOSSES

PAPERS = Fidelity("authors-code", "Someone 2020; github.com/someone/code")
RECONSTRUCTED = Fidelity("reconstruction", "Other 2024 (no code)", ("the distance is a guess",))
DEPARTING = Fidelity("authors-code", "Third 2021; github.com/third/code", ("batchmean, not mean",))
MCMI = "mcmi(lambda=0.1)"


@pytest.fixture
def records(monkeypatch):
    """kd: the paper's; ard: a reconstruction; ce (method): ours; teacher ce: the paper's;
    mcmi: the paper's with a departure; trades (MTARD's robust teacher): the paper's."""
    for name, f in {"kd": PAPERS, "ard": RECONSTRUCTED, "mtard": PAPERS}.items():
        monkeypatch.setattr(METHODS.get(name), "fidelity", f)
    monkeypatch.setattr(METHODS.get("ce"), "fidelity", Fidelity("ours", "a baseline"))
    for name, f in {"ce": PAPERS, "mcmi": DEPARTING, "trades": PAPERS}.items():
        monkeypatch.setattr(TEACHER_LOSSES.get(name), "fidelity", f)


@pytest.fixture
def spec(tmp_path):
    grid = {
        "teacher_loss": ["ce", {"name": "mcmi", "params": {"lambda": 0.1}}],
        "method": ["kd", "ard", "ce", "mtard"],
        "train_attack": ["pgd"],
    }
    d = tiny_spec_dict(tmp_path, grid=grid, teacher_sets={"robust": {"loss": "trades"}})
    return parse_spec(d)


def _teacher_run(label: str, loss: str) -> SimpleNamespace:
    """What the report reads of a teacher's MLflow run."""
    return SimpleNamespace(
        info=SimpleNamespace(run_name=f"teacher:{label}:0"),
        data=SimpleNamespace(
            tags={"kind": "teacher", "teacher_label": label},
            params={"loss": loss},
            metrics={"test/clean_acc": 0.9},
        ),
    )


def _best(cell: str) -> Best:
    m = ["test/clean_acc"]
    return Best(
        cell, "c", f"{cell}#0", "id", (0.5,), 1, "-", dict.fromkeys(m, 0.8), dict.fromkeys(m, nan)
    )


def _summary(spec, teachers: list) -> str:
    data = SweepData("fid", spec, {}, None, [], teachers)
    df = trials_table(spec, [])
    df["test/clean_acc"] = []
    best = {c: _best(c) for c in ("ce.kd.pgd", f"{MCMI}.kd.pgd", "ce.ard.pgd")}
    return summary_markdown(data, df, best, missing_lines(data, df, best))


def _cols(summary: str, first: str) -> list[str]:
    line = next(ln for ln in summary.splitlines() if ln.startswith(f"| {first} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_tables_mark_what_is_not_the_papers(records, spec):
    s = _summary(spec, [_teacher_run("ce", "ce"), _teacher_run(MCMI, "mcmi")])
    # best table: cell key kept as is, then teacher and method as shown
    assert _cols(s, "ce.kd.pgd")[:3] == ["ce.kd.pgd", "ce", "kd"]  # both the paper's: no mark
    assert _cols(s, "ce.ard.pgd")[:3] == ["ce.ard.pgd", "ce", f"ard{MARK}"]  # reconstruction
    assert _cols(s, f"{MCMI}.kd.pgd")[1:3] == [f"{MCMI}{MARK}", "kd"]  # loss with a departure
    assert _cols(s, "none.ce.pgd")[1:3] == ["—", f"ce{MARK}"]  # ours, no teacher
    assert _cols(s, "none.ce.pgd")[3] == "no finished trial"
    # comparison: method headings and teacher-loss column
    assert f"### ard{MARK}\n" in s and "### kd\n" in s and f"### ce{MARK}\n" in s
    assert _cols(s, "pgd")[:2] == ["pgd", f"{MCMI}{MARK}"]  # kd: mcmi's gain over ce
    # teachers table
    assert _cols(s, f"{MCMI}{MARK}")[1] == "90.00" and _cols(s, "ce")[1] == "90.00"


def test_every_method_and_teacher_loss_has_its_footnote(records, spec):
    s = _summary(spec, [_teacher_run("ce", "ce"), _teacher_run(MCMI, "mcmi")])
    notes = s.split("## Fidelity", 1)[1].split("## Missing", 1)[0]
    methods, losses = notes.split("### Teacher losses")
    for name, f in {"kd": PAPERS, "ard": RECONSTRUCTED, "mtard": PAPERS}.items():
        assert f"- `{name}`{MARK if f is RECONSTRUCTED else ''}: {f.tag()}, " in methods
        assert f"{CHECKED_MEANING[f.checked]}. Source: {f.source}." in methods
    assert f"- `ce`{MARK}: ours, {CHECKED_MEANING['ours']}. Source: a baseline." in methods
    assert "  - the distance is a guess" in methods  # a departure, as a sub-bullet
    assert f"- `mcmi`{MARK}: authors-code (1 departure), " in losses
    assert "  - batchmean, not mean" in losses
    assert "- `ce`: authors-code, " in losses
    assert "- `trades`: authors-code, " in losses  # MTARD's robust teacher: loaded by its cells
    assert "ard" not in losses and "mcmi" not in methods


def test_footnotes_follow_the_declared_records(spec):
    """Without overrides: whatever each entry declares is what the report says."""
    notes = footnotes(spec)
    for name in ("kd", "ard", "ce", "mtard"):
        f = METHODS.get(name).fidelity
        assert notes.methods[name] == f
        flagged = not f.is_papers or bool(f.departures)
        assert notes.method(name) == name + (MARK if flagged else "")
    assert set(notes.losses) == {"ce", "mcmi", "trades"}
    assert notes.label_loss[MCMI] == "mcmi" and notes.teacher("none") == "none"


def test_plot_labels_carry_the_mark(records, spec):
    """The Pareto plot names points by cell: a cell is marked when its teacher or its method is
    (a label with dots, `mcmi(lambda=0.1)`, is looked up, not split)."""
    notes = footnotes(spec)
    assert notes.cell("ce.kd.pgd") == "ce.kd.pgd"
    assert notes.cell("ce.ard.pgd") == f"ce.ard.pgd{MARK}"
    assert notes.cell(f"{MCMI}.kd.pgd") == f"{MCMI}.kd.pgd{MARK}"
    assert notes.cell("none.ce.pgd") == f"none.ce.pgd{MARK}"
    assert notes.cell("not.a.cell") == "not.a.cell"
