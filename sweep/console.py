"""The console a user watches while `sweep run` or `sweep resume` runs: one progress display.

On a terminal: one bar per grid cell (its trials ended of planned; running, stopped early by
ASHA, failed; the best value so far) and one for the whole sweep (trials ended, running, elapsed
and an estimate of what is left), drawn with tqdm. Every other line (a finished trial, a
warning, what a Ray worker printed, a log record) is written above the bars, so nothing tears
them. Anywhere else (a pipe, a file, `ray job logs`): plain lines without colour, one per ended
trial with its cell's counts and the sweep's, and a summary line when nothing has ended for a
while.

The driver's Tune callback feeds it events; nothing here imports Ray, so tests feed it by hand.
The best so far is selection.py's rule (the cell's trials that trained the whole budget), the
value `sweep status` shows once the sweep ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from tqdm import tqdm

from . import selection
from .spec import Objective

DONE, STOPPED, FAILED = "done", "stopped", "failed"  # how a trial ended
WHAT = {DONE: "done", STOPPED: "stopped by ASHA", FAILED: "FAILED"}


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def is_terminal(stream: Any) -> bool:
    """Whether `stream` is a terminal that a live display can redraw (TERM=dumb cannot)."""
    try:
        return bool(stream.isatty()) and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        return False


@dataclass
class CellTally:
    """One grid cell's trials as the display counts them."""

    planned: int
    done: int = 0  # trained the whole budget
    stopped: int = 0  # stopped early by ASHA
    failed: int = 0
    running: int = 0
    candidates: list[selection.Candidate] = field(default_factory=list)  # for the rule

    @property
    def ended(self) -> int:
        return self.done + self.stopped + self.failed


class SweepConsole:
    """The progress display of one `sweep run` / `sweep resume`.

    `cells`: the grid's cell keys, in order; `per_cell`: trials planned in a cell (tuning
    trials and seed repeats); `total`: trials planned in the sweep. `live`: draw bars (default:
    when `stream` is a terminal). Use it as `with console.showing(): ...` around Tune's run; in
    between, the driver reports `running_now`, `trial_progress`, `trial_ended`, `note`, `tick`.
    """

    def __init__(
        self,
        cells: Iterable[str],
        *,
        per_cell: int,
        total: int,
        objective: Objective | selection.Rule,
        epochs: int,
        stream: TextIO | None = None,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        heartbeat_s: float = 300.0,
        refresh_s: float = 1.0,
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.live = is_terminal(self.stream) if live is None else live
        self.cells = {c: CellTally(per_cell) for c in cells}
        self.total, self.objective, self.epochs = total, objective, epochs
        self.metrics = (
            objective.metrics if isinstance(objective, selection.Rule) else [objective.metric]
        )
        self.clock, self.heartbeat_s, self.refresh_s = clock, heartbeat_s, refresh_s
        self._fraction: dict[str, float] = {}  # running trial id -> share of its budget done
        self._lock = threading.RLock()
        self.t0 = clock()
        self._units0 = 0.0  # work done when this session began (a resumed sweep's earlier part)
        self._last_line = self._last_draw = self.t0
        self._bars: list[_Row] = []
        self._room = 0  # cells that get a bar of their own (fixed when the bars are made)
        self._restore: list[Callable[[], None]] = []
        self._out = self.stream

    # --- what the sweep knew before (a resumed sweep) -------------------------------------------
    def seed(
        self,
        cell: str,
        *,
        done: int = 0,
        stopped: int = 0,
        failed: int = 0,
        candidates: Iterable[selection.Candidate] = (),
    ) -> None:
        """Trials of `cell` that ended before this session; `candidates` for the best so far."""
        t = self.cells.setdefault(cell, CellTally(0))
        t.done, t.stopped, t.failed = t.done + done, t.stopped + stopped, t.failed + failed
        t.candidates.extend(candidates)

    # --- counts ---------------------------------------------------------------------------------
    @property
    def ended(self) -> int:
        return sum(t.ended for t in self.cells.values())

    @property
    def running(self) -> int:
        return sum(t.running for t in self.cells.values())

    def best(self, cell: str) -> float | None:
        """The cell's best value so far (the first objective's, if several), by selection.py's
        rule."""
        ranked = selection.best(self.cells[cell].candidates, self.objective)
        return ranked.score if ranked else None

    def best_scores(self, cell: str) -> tuple[float, ...] | None:
        """Every objective of the cell's best so far."""
        ranked = selection.best(self.cells[cell].candidates, self.objective)
        return ranked.scores if ranked else None

    def _units(self) -> float:
        """Trials' worth of work done: ended trials, and running ones by their epochs."""
        return self.ended + sum(self._fraction.values())

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def eta(self) -> float | None:
        """Seconds left at this session's pace, or None before any progress. An estimate:
        trials ASHA stops early end sooner than it assumes."""
        el, done = self.elapsed(), self._units() - self._units0
        if el <= 0 or done <= 0:
            return None
        return max(0.0, self.total - self._units()) * el / done

    def _clock_text(self) -> str:
        eta = None if self.ended >= self.total else self.eta()
        left = "" if eta is None else f", ~{duration(eta)} left"
        return f"{duration(self.elapsed())}{left}"

    def _head(self) -> str:
        return f"[{self.ended}/{self.total} trials, {self._clock_text()}]"

    def _best_text(self, cell: str) -> str:
        b = self.best_scores(cell)
        return "-" if b is None else "/".join(f"{v:.4f}" for v in b)

    @staticmethod
    def _counts(tallies: Iterable[CellTally]) -> str:
        """`1 done, 1 stopped, 0 failed, 1 running`."""
        ts = list(tallies)
        done, stopped = sum(t.done for t in ts), sum(t.stopped for t in ts)
        failed, running = sum(t.failed for t in ts), sum(t.running for t in ts)
        return f"{done} done, {stopped} stopped, {failed} failed, {running} running"

    def cell_text(self, cell: str) -> str:
        """`2/3: 1 done, 1 stopped, 0 failed, 1 running, best 0.7222`."""
        t = self.cells[cell]
        return f"{t.ended}/{t.planned}: {self._counts([t])}, best {self._best_text(cell)}"

    def summary_line(self) -> str:
        """The sweep in one line: `[5/12 trials, 2m05s, ~3m10s left] 4 done, 1 stopped,
        0 failed, 2 running (ce.kd.pgd 1, mse.ard.pgd 1)`."""
        running = ", ".join(f"{c} {t.running}" for c, t in self.cells.items() if t.running)
        return f"{self._head()} {self._counts(self.cells.values())}" + (
            f" ({running})" if running else ""
        )

    # --- events ---------------------------------------------------------------------------------
    def running_now(self, per_cell: dict[str, int]) -> None:
        """How many trials of each cell run now (Tune's view); cells not named run none."""
        with self._lock:
            for c, t in self.cells.items():
                t.running = per_cell.get(c, 0)
        self._draw()

    def trial_progress(self, trial_id: str, epoch: int) -> None:
        """A running trial reported `epoch` (of the budget): the estimate of what is left."""
        with self._lock:
            self._fraction[trial_id] = min(1.0, max(0.0, epoch / max(1, self.epochs)))

    def trial_ended(
        self,
        trial_id: str,
        cell: str,
        label: str,
        outcome: str,
        *,
        value: float | tuple[float, ...] | None = None,
        epoch: int = 0,
        config: str | None = None,
        number: int | None = None,
        repeat: int = 0,
        reason: str = "",
    ) -> str:
        """A trial ended `outcome` (DONE, STOPPED or FAILED) with the objective's `value` at
        `epoch`. `config`/`number`/`repeat` place a DONE trial for the rule (a seed repeat
        scores with its configuration). Returns the line shown."""
        with self._lock:
            t = self.cells.setdefault(cell, CellTally(0))
            setattr(t, outcome, getattr(t, outcome) + 1)
            t.running = max(0, t.running - 1)
            self._fraction.pop(trial_id, None)
            if outcome == DONE and isinstance(value, float | tuple):
                t.candidates.append(
                    selection.Candidate(config or label, number, repeat, value, True)
                )
            if outcome == FAILED and reason:
                shown = reason
            elif isinstance(value, float | tuple):
                values = value if isinstance(value, tuple) else (value,)
                shown = ", ".join(f"{m}={v:.4f}" for m, v in zip(self.metrics, values, strict=True))
            else:
                shown = "no result"
            line = f"{self._head()} {label} {WHAT[outcome]}: {shown} (epoch {epoch}/{self.epochs})"
            if not self.live:  # on a terminal the cell's bar says it
                line += f" | {cell} {self.cell_text(cell)}"
        self.line(line)
        return line

    def note(self, text: str) -> None:
        """A line of its own: a warning, a retry."""
        self.line(text)

    def tick(self, running: Callable[[], dict[str, int]] | None = None) -> None:
        """Called often (every step of Tune's loop). Redraws the bars about once a second
        (`running()` is asked then, not on every call); in plain mode prints the summary line
        when nothing was printed for `heartbeat_s`."""
        now = self.clock()
        if self.live:
            if now - self._last_draw < self.refresh_s:
                return
            if running is not None:
                self.running_now(running())  # draws
            else:
                self._draw(force=True)
        elif now - self._last_line >= self.heartbeat_s:
            if running is not None:
                self.running_now(running())
            self.line(self.summary_line())

    # --- output ---------------------------------------------------------------------------------
    def line(self, text: str) -> None:
        """Print `text`: above the bars when they are shown, else as a plain line."""
        self._last_line = self.clock()
        if self._bars:
            self._above(text)
            self._draw(force=True)
        else:
            print(text, file=self.stream, flush=True)

    @contextlib.contextmanager
    def showing(self) -> Iterator[SweepConsole]:
        """The display, for the duration of the block (Tune's run). Live: the bars, with
        everything written to this process's stdout/stderr (print, logging, the lines Ray
        forwards from its workers) moved above them; the terminal is given back as it was."""
        with self._lock:
            self.t0 = self._last_line = self._last_draw = self.clock()
            self._units0 = self._units()
        if not self.live:
            yield self
            return
        try:
            self._start_live()
            yield self
        finally:
            self._stop_live()

    def _start_live(self) -> None:
        width = min(36, max((len(c) for c in self.cells), default=4))
        lines = shutil.get_terminal_size((100, 24)).lines
        self._room = max(3, min(30, lines - 6))
        for i in range(len(self._rows()) + 1):
            fmt = "  {name:<" + str(width) + "} |{bar:16}| {n_fmt}/{total_fmt}: {detail}"
            self._bars.append(
                _Row(
                    total=1,
                    position=i,
                    leave=False,
                    file=self._out,
                    bar_format=fmt,
                    dynamic_ncols=True,
                    fields={"name": "", "detail": ""},
                )
            )
        self._redirect()
        self._draw(force=True)

    def _stop_live(self) -> None:
        for undo in reversed(self._restore):
            undo()
        self._restore = []
        bars, self._bars = self._bars, []
        for bar in reversed(bars):
            bar.close()
        self._out.flush()

    def _rows(self) -> list[str]:
        """The cells that get a bar: all if the terminal has room, else those running first,
        then those not ended, in grid order; the last bar then sums up the others."""
        room = self._room
        cells = list(self.cells)
        if len(cells) <= room:
            return cells
        order = sorted(
            cells,
            key=lambda c: (not self.cells[c].running, self.cells[c].ended >= self.cells[c].planned),
        )
        return order[: room - 1] + ["..."]

    def _draw(self, force: bool = False) -> None:
        if not self._bars:
            return
        with self._lock:
            now = self.clock()
            if not force and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            rows = self._rows()
            shown = set(rows)
            for bar, cell in zip(self._bars, rows, strict=False):
                if cell == "...":
                    rest = [t for c, t in self.cells.items() if c not in shown]
                    n, total = sum(t.ended for t in rest), sum(t.planned for t in rest)
                    bar.show(f"+{len(rest)} cells", n, total, self._counts(rest))
                else:
                    t = self.cells[cell]
                    detail = f"{self._counts([t])}, best {self._best_text(cell)}"
                    bar.show(cell, t.ended, t.planned, detail)
            detail = f"{self._counts(self.cells.values())} | {self._clock_text()}"
            self._bars[-1].show("sweep", self.ended, self.total, detail)

    def _redirect(self) -> None:
        """While the bars are shown, text for this terminal goes above them: sys.stdout, and
        sys.stderr and logging handlers writing to it when stderr is the same terminal."""
        real_out, real_err = sys.stdout, sys.stderr
        proxies: dict[int, _Lines] = {}
        same = _same_terminal(real_out, self._out)
        if same:
            proxies[id(real_out)] = _Lines(real_out, self._above)
            sys.stdout = proxies[id(real_out)]
            self._restore.append(lambda: setattr(sys, "stdout", real_out))
        if _same_terminal(real_err, self._out):
            proxies[id(real_err)] = _Lines(real_err, self._above)
            sys.stderr = proxies[id(real_err)]
            self._restore.append(lambda: setattr(sys, "stderr", real_err))
        loggers = [logging.getLogger()] + [
            lg
            for lg in logging.Logger.manager.loggerDict.values()
            if isinstance(lg, logging.Logger)
        ]
        for lg in loggers:
            for h in lg.handlers:
                stream = getattr(h, "stream", None)
                if type(h) is logging.StreamHandler and id(stream) in proxies:
                    h.setStream(proxies[id(stream)])
                    self._restore.append(lambda h=h, s=stream: h.setStream(s))

    def _above(self, text: str) -> None:
        self._last_line = self.clock()
        tqdm.write(text, file=self._out)


class _Row(tqdm):
    """One bar whose text comes from `fields` (tqdm's documented format_dict extension)."""

    monitor_interval = 0  # no monitor thread: the display redraws on events and ticks

    def __init__(self, *args: Any, fields: dict[str, str], **kwargs: Any) -> None:
        self.fields = dict(fields)
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> dict[str, Any]:
        d = super().format_dict
        d.update(self.fields)
        return d

    def show(self, name: str, n: int, total: int, detail: str) -> None:
        self.fields.update(name=name, detail=detail)
        self.total, self.n = max(1, total), min(n, max(1, total))
        self.refresh()


class _Lines:
    """A text stream whose complete lines go to `emit` (text written above the bars)."""

    def __init__(self, real: TextIO, emit: Callable[[str], None]) -> None:
        self._real, self._emit, self._buf = real, emit, ""
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        with self._lock:
            self._buf += s
            *lines, self._buf = self._buf.split("\n")
        for line in lines:
            self._emit(line.rstrip("\r"))
        return len(s)

    def flush(self) -> None:
        pass  # a partial line waits for its end: half a line above the bars would be torn

    def isatty(self) -> bool:
        return self._real.isatty()

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, ...
        return getattr(self._real, name)


def _same_terminal(a: Any, b: Any) -> bool:
    """Whether streams a and b reach the same terminal."""
    if a is b:
        return True
    try:
        return is_terminal(a) and os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno()))
    except (AttributeError, OSError, ValueError):
        return False
