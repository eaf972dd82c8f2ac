"""The progress display of `sweep run` (sweep/console.py), fed trial events by hand: no Ray.

Plain mode (a pipe, `ray job logs`) prints uncoloured lines with each cell's counts and the
sweep's clock; live mode (a terminal) draws bars and writes every other line above them; the
run ends with `sweep status`'s table (status.status_table), built here from an Optuna storage.
"""

from __future__ import annotations

import io
import logging
import re
import sys

import optuna
import pytest

from sweep import selection
from sweep.console import DONE, FAILED, STOPPED, SweepConsole, duration
from sweep.spec import Objective

ANSI = re.compile(r"\x1b\[")
CELLS = ["ce.kd.pgd", "mse.kd.pgd"]
VAL = "val/robust_acc"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _console(stream, clock, *, live=False, mode="max", **kw) -> SweepConsole:
    return SweepConsole(
        CELLS,
        per_cell=3,
        total=6,
        objective=Objective(metric=VAL, mode=mode),
        epochs=8,
        stream=stream,
        live=live,
        clock=clock,
        **kw,
    )


def _end(c, tid, cell, n, outcome, value=None, epoch=8, **kw):
    return c.trial_ended(
        tid,
        cell,
        f"{cell}#{n}",
        outcome,
        value=value,
        epoch=epoch,
        config=f"{cell}/{n}",
        number=n,
        **kw,
    )


def test_plain_lines_carry_each_cells_counts_the_best_and_the_clock_without_colour():
    out, clock = io.StringIO(), Clock()
    c = _console(out, clock)
    assert not c.live  # a StringIO is no terminal
    with c.showing():
        c.running_now({"ce.kd.pgd": 1, "mse.kd.pgd": 1})
        clock.t += 30
        c.trial_progress("a", 4)  # half of trial a's budget
        clock.t += 30
        _end(c, "a", "ce.kd.pgd", 0, DONE, 0.7)
        c.running_now({"ce.kd.pgd": 1, "mse.kd.pgd": 1})
        clock.t += 30
        _end(c, "b", "mse.kd.pgd", 0, STOPPED, 0.9, epoch=4)  # ASHA: not a best
        clock.t += 30
        _end(c, "c", "ce.kd.pgd", 1, FAILED, epoch=2, reason="RuntimeError: boom")
    text = out.getvalue()
    assert not ANSI.search(text), text
    lines = text.splitlines()
    assert len(lines) == 3, text
    assert lines[0] == (
        "[1/6 trials, 1m00s, ~5m00s left] ce.kd.pgd#0 done: val/robust_acc=0.7000 (epoch 8/8)"
        " | ce.kd.pgd 1/3: 1 done, 0 stopped, 0 failed, 0 running, best 0.7000"
    )
    # a stopped trial's value is from an earlier epoch: not the cell's best (selection.py)
    assert "mse.kd.pgd#0 stopped by ASHA: val/robust_acc=0.9000 (epoch 4/8)" in lines[1]
    assert lines[1].endswith("mse.kd.pgd 1/3: 0 done, 1 stopped, 0 failed, 0 running, best -")
    assert lines[2].startswith("[3/6 trials, 2m00s, ~2m00s left] ce.kd.pgd#1 FAILED: ")
    assert "RuntimeError: boom (epoch 2/8)" in lines[2]
    assert lines[2].endswith("ce.kd.pgd 2/3: 1 done, 0 stopped, 1 failed, 0 running, best 0.7000")
    assert c.ended == 3 and c.best("ce.kd.pgd") == 0.7 and c.best("mse.kd.pgd") is None


def test_the_best_so_far_is_selection_rule_in_both_modes():
    out, clock = io.StringIO(), Clock()
    c = _console(out, clock, mode="min")
    _end(c, "a", "ce.kd.pgd", 0, DONE, 0.4)
    _end(c, "b", "ce.kd.pgd", 1, DONE, 0.3)
    assert c.best("ce.kd.pgd") == 0.3
    # a seed repeat of #0 scores with its configuration: by the tuned trial's value
    _end(c, "r", "ce.kd.pgd", 0, DONE, 0.1, repeat=1)
    assert c.best("ce.kd.pgd") == 0.3
    cands = c.cells["ce.kd.pgd"].candidates
    obj = Objective(metric=VAL, mode="min")
    assert selection.best(cands, obj).config == "ce.kd.pgd/1"


def test_without_news_plain_mode_prints_a_summary_line_now_and_then():
    out, clock = io.StringIO(), Clock()
    c = _console(out, clock, heartbeat_s=300)
    with c.showing():
        running = {"mse.kd.pgd": 2}
        clock.t += 299
        c.tick(lambda: running)
        assert out.getvalue() == ""
        clock.t += 1
        c.tick(lambda: running)
        c.tick(lambda: running)  # not twice
    assert out.getvalue() == (
        "[0/6 trials, 5m00s] 0 done, 0 stopped, 0 failed, 2 running (mse.kd.pgd 2)\n"
    )


def test_a_resumed_sweep_starts_from_what_ended_before_and_estimates_from_this_session():
    out, clock = io.StringIO(), Clock()
    c = _console(out, clock)
    earlier = selection.Candidate("ce.kd.pgd/0", 0, 0, 0.8, True)
    c.seed("ce.kd.pgd", done=1, stopped=1, candidates=[earlier])
    c.seed("mse.kd.pgd", failed=1)
    clock.t += 3600  # the time between the runs is not this session's
    with c.showing():
        clock.t += 60
        line = _end(c, "x", "mse.kd.pgd", 1, DONE, 0.5)
    # 4 of 6 ended, one of them in this session's minute: 2 left, ~2 minutes
    assert line.startswith("[4/6 trials, 1m00s, ~2m00s left] mse.kd.pgd#1 done")
    assert line.endswith("mse.kd.pgd 2/3: 1 done, 0 stopped, 1 failed, 0 running, best 0.5000")
    assert c.best("ce.kd.pgd") == 0.8


def test_eta_counts_running_trials_by_their_epochs_and_is_not_shown_once_all_ended():
    clock = Clock()
    c = _console(io.StringIO(), clock)
    with c.showing():
        assert c.eta() is None  # no progress yet: no estimate
        clock.t += 100
        c.trial_progress("a", 4)
        c.trial_progress("b", 4)  # one trial's worth of work in 100 s, 5 left
        assert c.eta() == pytest.approx(500)
        for i, (tid, cell) in enumerate([("a", CELLS[0]), ("b", CELLS[1])] * 3):
            _end(c, f"{tid}{i}", cell, i, DONE, 0.5)
    assert "left" not in c.summary_line()


def test_durations_read_as_a_person_writes_them():
    assert [duration(s) for s in (0, 42, 185, 7620, -3)] == ["0s", "42s", "3m05s", "2h07m", "0s"]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_mode_draws_bars_and_writes_every_other_line_above_them(monkeypatch):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setenv("TERM", "xterm")
    log = logging.getLogger("kdsweep.test_console")
    handler = logging.StreamHandler(term)
    log.addHandler(handler)
    try:
        clock = Clock()
        c = _console(term, clock, live=None)
        assert c.live  # the default: a terminal gets bars
        with c.showing():
            assert sys.stdout is not term  # print() goes above the bars
            print("(trainable pid=1) teacher ce: trained 15 epochs", flush=True)
            log.warning("a warning from a logger")
            c.running_now({"ce.kd.pgd": 1})
            clock.t += 10
            line = _end(c, "a", "ce.kd.pgd", 0, DONE, 0.75)
        assert sys.stdout is term and handler.stream is term  # all given back
    finally:
        log.removeHandler(handler)
    screen = term.getvalue()
    assert "(trainable pid=1) teacher ce: trained 15 epochs\n" in screen
    assert "a warning from a logger\n" in screen
    # the trial's line (its cell's counts are on the cell's bar) and the bars
    assert (
        line == "[1/6 trials, 10s, ~50s left] ce.kd.pgd#0 done: val/robust_acc=0.7500 (epoch 8/8)"
    )
    assert line + "\n" in screen
    assert re.search(
        r"ce\.kd\.pgd +\|.*\| 1/3: 1 done, 0 stopped, 0 failed, 0 running, best 0\.7500", screen
    )
    assert re.search(
        r"mse\.kd\.pgd +\|.*\| 0/3: 0 done, 0 stopped, 0 failed, 0 running, best -", screen
    )
    assert re.search(r"sweep +\|.*\| 1/6: 1 done, 0 stopped, 0 failed, 0 running \| 10s", screen)


def _study_trials(storage, layout, cell, trials):
    study = optuna.create_study(
        study_name=layout.study_name(cell), storage=storage, direction="maximize"
    )
    dist = {"temperature": optuna.distributions.FloatDistribution(1.0, 4.0)}
    for state, value, temp in trials:
        study.add_trial(
            optuna.trial.create_trial(
                state=state,
                value=value if state == optuna.trial.TrialState.COMPLETE else None,
                intermediate_values={1: value} if value is not None else {},
                params={"temperature": temp},
                distributions=dist,
            )
        )


def test_the_run_ends_with_the_table_sweep_status_prints(tiny_spec):
    from sweep.layout import SweepLayout
    from sweep.spec import parse_spec
    from sweep.status import cell_status, status_table

    spec = parse_spec(tiny_spec)
    layout = SweepLayout.of(spec)
    layout.store().write(b"", "sweep.yaml")  # the sweep folder, where optuna.db lives
    S = optuna.trial.TrialState
    storage = optuna.storages.RDBStorage(layout.optuna_url)
    _study_trials(storage, layout, "ce.kd.pgd", [(S.COMPLETE, 0.6, 2.0), (S.PRUNED, 0.9, 3.0)])
    _study_trials(storage, layout, "mse.ard.pgd", [(S.FAIL, None, 1.5), (S.COMPLETE, 0.7, 1.25)])
    table = status_table(spec, layout, None, mlflow="MLflow: here")
    assert not ANSI.search(table)
    lines = table.splitlines()
    assert lines[0] == "sweep tiny: objective max val/robust_acc"
    assert lines[1].split() == ["cell", "done", "stopped", "running", "failed", "todo", "best"]
    rows = {ln.split()[0]: ln.split() for ln in lines[2:-1]}
    assert rows["ce.kd.pgd"][1:] == ["1", "1", "0", "0", "0", "0.6000", "(temperature=2)"]
    assert rows["mse.ard.pgd"][1:] == ["1", "0", "0", "1", "0", "0.7000", "(temperature=1.25)"]
    assert rows["mse.kd.pgd"][1:] == ["0", "0", "0", "0", "2"]  # nothing started, no best
    assert lines[-1] == "MLflow: here"
    # what a resumed sweep's display starts from: the same counts and candidates
    by_cell = {c.cell: c for c in cell_status(spec, layout, None)}
    assert (by_cell["ce.kd.pgd"].done, by_cell["ce.kd.pgd"].stopped) == (1, 1)
    assert [x.value for x in by_cell["ce.kd.pgd"].candidates] == [0.6]


def test_a_grid_taller_than_the_terminal_gets_a_bar_for_the_running_cells_and_one_for_the_rest(
    monkeypatch,
):
    monkeypatch.setenv("LINES", "12")  # room for 6 bars beside the sweep's
    cells = [f"l{i}.kd.pgd" for i in range(20)]
    term = FakeTerminal()
    c = SweepConsole(
        cells,
        per_cell=2,
        total=40,
        objective=Objective(metric=VAL, mode="max"),
        epochs=8,
        stream=term,
        live=True,
        clock=Clock(),
    )
    with c.showing():
        c.running_now({"l17.kd.pgd": 1})
        for n in range(2):  # l3 has ended: the rest's bar counts it
            c.trial_ended(str(n), "l3.kd.pgd", f"l3.kd.pgd#{n}", DONE, value=0.5, epoch=8)
        assert len(c._bars) == 7
        assert c._rows() == [
            "l17.kd.pgd",
            "l0.kd.pgd",
            "l1.kd.pgd",
            "l2.kd.pgd",
            "l4.kd.pgd",
            "...",
        ]
    screen = term.getvalue()
    assert re.search(r"l17\.kd\.pgd +\|.*\| 0/2: 0 done, 0 stopped, 0 failed, 1 running", screen)
    assert re.search(r"\+15 cells +\|.*\| 2/30: 2 done, 0 stopped, 0 failed, 0 running", screen)
