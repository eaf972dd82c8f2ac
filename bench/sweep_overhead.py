"""Sweep overhead: the quickstart's trials through `sweep run` vs the same trials in a plain loop.

What is compared, measured side by side in one run (in a temporary storage folder):

- **sweep**: `sweep run search_spaces/quickstart.yaml` (sweep.cli.main, in this process): real
  embedded Ray, Tune with CellSearcher (one Optuna study per cell, SQLite) and CellASHA, MLflow
  in SQLite, 2 trials at once with 1 torch thread each (`cpus_per_trial: 1` on 2 cores), and the
  end-of-sweep step that tests the trials ASHA stopped (in the driver: embedded CPU-only Ray,
  sweep.driver._with_trial_resources). Its figure includes `import
  ray`/optuna, Ray's start-up (sweep.driver.init_ray, the call `sweep run` makes, timed on its
  own first; it is then a no-op inside run_sweep) and `ray.shutdown()`.
- **loop**: exactly the trials the sweep ran, read back from its Tune results (each a
  TrialConfig: cell, hp, seed, Optuna trial number, trial id) and checked against its own
  per-trial checkpoints, run one after another in this process through `sweep.trial.run_trial`
  with a `SweepContext` (no Ray, no Optuna). Each
  trial stops at the epoch it reached in the sweep: the report callback raises at that epoch what
  Ray raises there for a trial ASHA stopped (SystemExit, which run_trial does not catch, so its
  MLflow run stays RUNNING), and those trials are then tested from their checkpoints with
  `finalize_from_state`, as the sweep's end step does. Same MLflow logging (own experiment, a
  parent run with its sweep.yaml artifact, same SQLite database), same checkpoint every epoch.
- **teacher cache**: both teachers are trained before anything is timed (in an experiment of
  their own), so neither side trains one; both load them from the same cache and log a `cached`
  teacher run in their experiment.
- **parallelism**: the loop runs with 2 torch threads (the whole machine to one trial at a time:
  what a plain loop does here; sweep / loop 2t is the issue's ratio) and with 1 thread (each
  trial exactly as the sweep runs it: the same metrics bit for bit, which is checked; 2 threads
  reduce in another order, so those differ). sweep / (loop 1t / 2) compares the sweep with a
  perfect packing of its 1-thread trials on 2 cores (no start-up, no idle slot).

Excluded from both: starting Python and importing torch/mlflow/kdsweep in this process, and the
MLflow database's creation (during the warm-up). The loop process has the dataset and the MLflow
store open from the warm-up; each Ray actor opens its own, which is part of what the sweep costs
("a fresh worker process" below measures it).

Printed: the sweep's phases; Tuner.fit broken down per actor slot from the trials' MLflow runs
(actor start-up until its first trial's run exists, training, gaps between trials, idle tail);
CPU seconds of the driver, Ray's daemons and its workers; the loops' totals and per-trial times;
the ratios, in wall-clock time and in CPU seconds; what a fresh worker process spends before its
first trial. The cores used by other processes during each phase are printed: wall ratios taken
while others used the machine are not comparable (a 2-thread loop suffers most).

Why: Ray, Tune, Optuna and MLflow must not cost a user much over the training itself (project
issue 9: sweep / loop <= 1.15 on 2 CPU cores).

    python bench/sweep_overhead.py                      # both loop variants (~8 min, 2 cores)
    python bench/sweep_overhead.py --loop-threads 2     # one variant
    python bench/sweep_overhead.py --keep               # keep the storage (logs, MLflow, Tune)

Not a test: timings depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sweep.checkpoints import STOPPED
from sweep.config import TrialConfig
from sweep.context import SweepContext, get_splits
from sweep.layout import SweepLayout
from sweep.spec import load_spec, parse_spec, spec_to_dict
from sweep.teachers import get_teachers
from sweep.tracking import Tracker, default_artifact_root, resolve_tracking_uri
from sweep.trial import finalize_from_state, run_trial

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "search_spaces" / "quickstart.yaml"
QUIET = 0.25  # cores used by other processes above which the wall-clock ratios are not trusted


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--file", default=str(QUICKSTART), help="sweep file (default: the quickstart)")
    p.add_argument(
        "--loop-threads",
        default="2,1",
        help="torch threads of each loop variant, comma-separated (default 2,1)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary storage folder")
    p.add_argument("--verbose", action="store_true", help="show the sweep's and trials' output")
    return p.parse_args(argv)


@contextlib.contextmanager
def redirected(log: Path, enabled: bool) -> Iterator[None]:
    """Send this process's stdout/stderr (file descriptors, so Ray's forwarded worker output
    too) to `log` while the sweep or a loop runs: the figures stay readable."""
    if not enabled:
        yield
        return
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def _machine_busy() -> float:
    """CPU seconds the whole machine has been busy so far (every process), from /proc/stat
    (Linux; NaN elsewhere)."""
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = f
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


DAEMONS = ("gcs_server", "raylet", "log_monitor", "monitor.py", "dashboard", "Agent")


def _descendants_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of each descendant of this process (Ray's processes), from /proc:
    pid -> (command line, user + system seconds). Linux only; empty elsewhere."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, info = {}, {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2 :].split()  # the fields after "pid (comm)"
        parent[int(d.name)] = int(f[1])
        info[int(d.name)] = (cmd, (int(f[11]) + int(f[12])) / tick)
    mine, todo = set(), [os.getpid()]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        mine.update(kids)
        todo += kids
    return {p: info[p] for p in mine}


class RayCpu(threading.Thread):
    """Samples the CPU time of Ray's processes every `period` s while the sweep runs: trial
    actors and task workers exit before the end (and the raylet reaps them without adding
    their time to its own counters), so their last sample is what is counted."""

    def __init__(self, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period, self.seen = period, {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.seen |= _descendants_cpu()
            self.done.wait(self.period)

    def stop(self) -> dict[str, float]:
        """CPU seconds: Ray's daemons (GCS, raylet, agents, monitors) and workers."""
        self.done.set()
        self.join()
        self.seen |= _descendants_cpu()
        out = {"daemons": 0.0, "workers": 0.0}
        for cmd, cpu in self.seen.values():
            out["daemons" if any(k in cmd for k in DAEMONS) else "workers"] += cpu
        return out


@dataclass
class SweepRun:
    """What the timed `sweep run` gives: phase durations (s) and Tune's results."""

    phases: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    results: list[Any] = field(default_factory=list)
    exit_code: int = -1
    others: float = 0.0  # cores used on average by processes not of this benchmark
    fit_span: tuple[float, float] = (0.0, 0.0)  # Tuner.fit's start and end (time.time())
    uri: str = ""


@contextlib.contextmanager
def timed_attr(owner: Any, attr: str, into: dict[str, Any], label: str) -> Iterator[None]:
    """Wrap `owner.attr` so its call's duration (and return value) is recorded in `into`
    (instrumentation only: the call itself is unchanged). Restored afterwards."""
    original = getattr(owner, attr)

    def wrapper(*args: Any, **kw: Any) -> Any:
        t0, wall0 = time.perf_counter(), time.time()
        try:
            out = original(*args, **kw)
        finally:
            into[label] = into.get(label, 0.0) + time.perf_counter() - t0
            into[f"{label} span"] = (wall0, time.time())
        into[f"{label} returned"] = out
        return out

    setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        setattr(owner, attr, original)


def run_sweep_cli(file: Path) -> SweepRun:
    """`sweep run FILE` in this process, with Ray's start-up and the phases timed."""
    import ray
    from ray import tune

    import sweep.driver as sd
    from sweep.cli import main as sweep_main

    out = SweepRun()
    cpu0, busy0, wall0 = _cpu_self(), _machine_busy(), time.perf_counter()
    sampler = RayCpu()
    sampler.start()
    t = time.perf_counter()
    sd.init_ray(None)  # what run_sweep does first; then a no-op there
    out.phases["Ray start-up"] = time.perf_counter() - t
    rec: dict[str, Any] = {}
    t = time.perf_counter()
    with (
        timed_attr(tune.Tuner, "fit", rec, "Tuner.fit"),
        timed_attr(sd, "_finalize_early_stopped", rec, "ASHA finalize"),
    ):
        out.exit_code = sweep_main(["run", str(file)])
    run_s = time.perf_counter() - t
    out.cpu = {"driver": _cpu_self() - cpu0, **sampler.stop()}
    busy = _machine_busy() - busy0
    out.others = (busy - sum(out.cpu.values())) / (time.perf_counter() - wall0)
    t = time.perf_counter()
    ray.shutdown()
    out.phases["ray.shutdown"] = time.perf_counter() - t
    out.phases["run_sweep, before Tuner.fit"] = run_s - rec["Tuner.fit"] - rec["ASHA finalize"]
    out.phases["Tuner.fit (trials)"] = rec["Tuner.fit"]
    out.phases["ASHA finalize (tests)"] = rec["ASHA finalize"]
    out.results = list(rec["Tuner.fit returned"])
    out.fit_span = rec["Tuner.fit span"]
    return out


def warm_teachers(spec: Any, storage: Path, uri: str) -> float:
    """Train every teacher of the sweep into the shared cache before anything is timed."""
    t0 = time.perf_counter()
    warm = parse_spec({**spec_to_dict(spec), "name": f"{spec.name}-warm"})
    ctx = SweepContext(warm, SweepLayout.of(warm), uri, warm.name, None)  # the same cache
    device = torch.device("cpu")
    get_teachers(ctx, spec.all_teachers(), get_splits(spec, device), device)
    return time.perf_counter() - t0


@dataclass(frozen=True)
class Trial:
    """One trial as the sweep ran it: its config and the epoch it reached."""

    config: TrialConfig
    epoch: int
    objective: float
    tune_seconds: float


def trials_run(spec: Any, sweep_dir: Path, results: list[Any]) -> list[Trial]:
    """The sweep's trials from Tune's results, each checked against its own checkpoint."""
    from sweep.checkpoints import TrialCheckpoints

    ckpts = TrialCheckpoints(str(sweep_dir / "trials"))
    metric = spec.objectives[0].metric
    out = []
    for r in results:
        if r.error is not None:
            raise SystemExit(f"trial {r.config.get('trial_id')} failed in the sweep: {r.error}")
        epoch = int(r.metrics["epoch"])
        config = TrialConfig.from_dict(r.config)
        state = ckpts.state(config.key)
        assert state is not None and state["epoch"] == epoch, (config, epoch)
        out.append(Trial(config, epoch, float(r.metrics[metric]), r.metrics["time_total_s"]))
    return sorted(out, key=lambda t: (t.config.cell, t.config.number, t.config.repeat))


class StopAtEpoch(SystemExit):
    """What Ray raises inside a trial's `report` when ASHA stops it: SystemExit (see
    ray.train._internal.session: sys.exit(0) after the stop event), not an Exception, so
    run_trial neither marks the run FAILED nor logs anything more."""


@dataclass
class LoopRun:
    threads: int
    wall: float = 0.0
    setup: float = 0.0
    train: list[float] = field(default_factory=list)
    finalize: float = 0.0
    cpu: float = 0.0
    others: float = 0.0
    same_metric: int = 0


def run_loop(spec: Any, storage: Path, uri: str, trials: list[Trial], threads: int) -> LoopRun:
    """The sweep's trials one after another in this process, `threads` torch threads."""
    out = LoopRun(threads)
    t0, cpu0, busy0 = time.perf_counter(), _cpu_self(), _machine_busy()
    name = f"{spec.name}-loop-{threads}t"
    lspec = parse_spec({**spec_to_dict(spec), "name": name})
    experiment = name
    tracker = Tracker(uri, experiment, default_artifact_root(uri, experiment))
    parent = tracker.start_run(name, tags={"kind": "sweep", "sweep": name})
    tracker.log_artifacts(parent, {"sweep.yaml": (storage / spec.name / "sweep.yaml").read_text()})
    # the sweep's storage and teacher cache, its own folder `name`
    ctx = SweepContext(lspec, SweepLayout.of(lspec), uri, experiment, parent)
    metric = spec.objectives[0].metric
    out.setup = time.perf_counter() - t0
    stopped = []
    for t in trials:
        last: dict[str, float] = {}

        def report(
            metrics: dict[str, float], _state: dict, t: Trial = t, last: dict = last
        ) -> None:
            last.update(metrics)
            if metrics["epoch"] == t.epoch and t.epoch < spec.budget.epochs:
                raise StopAtEpoch(0)

        s = time.perf_counter()
        try:
            run_trial(ctx, t.config, report, threads=threads)
        except StopAtEpoch:
            ctx.checkpoints().set_outcome(t.config.key, STOPPED, "asha")  # as driver.Progress
            stopped.append(t)
        out.train.append(time.perf_counter() - s)
        assert last["epoch"] == t.epoch, (t.config, last)
        out.same_metric += last[metric] == t.objective
    s = time.perf_counter()
    torch.set_num_threads(threads)
    for t in stopped:  # as the sweep's end step (there: Ray tasks, 2 at once, 1 thread each)
        finalize_from_state(ctx, t.config, ctx.checkpoints().state(t.config.key))
    out.finalize = time.perf_counter() - s
    tracker.finish(parent)
    out.wall, out.cpu = time.perf_counter() - t0, _cpu_self() - cpu0
    out.others = (_machine_busy() - busy0 - out.cpu) / out.wall
    return out


def slot_timeline(uri: str, experiment: str, fit: tuple[float, float]) -> dict[str, Any]:
    """How Tuner.fit's trial slots (one Ray actor each) spent their time, from the trials'
    MLflow runs: a run is created once its trial has its data, teachers and tracker (ready to
    train); it is done at its end (finished in the trial) or its last metric (stopped by ASHA,
    tested after Tuner.fit). Slot-seconds, summed over the actors (tag worker_pid)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'student'", max_results=10000)
    spans: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        history = client.get_metric_history(r.info.run_id, "train/loss")
        last = max(m.timestamp for m in history) / 1000
        end = (r.info.end_time or 0) / 1000
        done = end if last <= end <= fit[1] else last
        spans.setdefault(r.data.tags["worker_pid"], []).append((r.info.start_time / 1000, done))
    out: dict[str, Any] = {
        "actor start-up (to 1st run)": 0.0,
        "trials (run start to done)": 0.0,
        "between trials": 0.0,
        "idle at the end": 0.0,
    }
    starts = []
    for s in spans.values():
        s.sort()
        starts.append(s[0][0] - fit[0])
        out["trials (run start to done)"] += sum(e - b for b, e in s)
        out["between trials"] += sum(b[0] - a[1] for a, b in zip(s, s[1:], strict=False))
        out["idle at the end"] += fit[1] - s[-1][1]
    out["actor start-up (to 1st run)"] = sum(starts)
    out["actors"] = len(spans)
    out["start-up per actor"] = sorted(starts)
    return out


PROBE = """
import json, sys, time
t = time.perf_counter(); out = {}
def lap(k):
    global t
    now = time.perf_counter(); out[k] = now - t; t = now
import torch; lap("import torch")
import sweep.trial; lap("import kdsweep, mlflow")
from ray import tune; lap("import ray.tune")
from sweep.context import get_splits
from sweep.layout import open_sweep
from sweep.tracking import Tracker
opened = open_sweep(sys.argv[1], sys.argv[2])
state, spec = opened.state, opened.spec
torch.set_num_threads(1)
get_splits(spec, torch.device("cpu")); lap("dataset (%s)" % spec.dataset.name)
Tracker(state["mlflow_tracking_uri"], state["experiment"]); lap("MLflow store and experiment")
print(json.dumps(out))
"""


def fresh_process_setup(name: str, storage: Path) -> dict[str, float]:
    """What a fresh Ray worker (each trial actor) pays before its
    first trial can start, measured in a new Python process (1 thread) after the sweep."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, name, str(storage)], capture_output=True, text=True
    )
    if done.returncode:
        return {"probe failed": float("nan")}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(label: str, value: float, unit: str = "s") -> None:
    print(f"  {label:<34} {value:8.2f} {unit}")


def print_sweep(spec: Any, sw: SweepRun, trials: list[Trial], total: float) -> None:
    stopped = sum(t.epoch < spec.budget.epochs for t in trials)
    print(
        f"\nsweep (`sweep run`, {spec.resources.cpus_per_trial:g} CPU and 1 torch thread per "
        f"trial): {len(trials)} trials, {sum(t.epoch for t in trials)} epochs in all, "
        f"{stopped} trials stopped by ASHA"
    )
    for k, v in sw.phases.items():
        _row(k, v)
    _row("sweep total", total)
    tune_s = sum(t.tune_seconds for t in trials)
    _row("per trial (Tune time_total_s), mean", tune_s / len(trials))
    _row("trial slots busy in Tuner.fit", tune_s / sw.phases["Tuner.fit (trials)"], "")
    slots = slot_timeline(sw.uri, spec.name, sw.fit_span)
    print(
        f"  Tuner.fit x {slots.pop('actors')} actors, in slot-seconds (from the MLflow runs; "
        "between trials: reset, next config, teacher load):"
    )
    starts = slots.pop("start-up per actor")
    for k, v in slots.items():
        _row(f"  {k}", v, "slot-s")
    print(f"    start-up per actor: {', '.join(f'{v:.1f} s' for v in starts)}")
    if sw.cpu.get("daemons"):
        for k in ("driver", "daemons", "workers"):
            _row(f"CPU: {'Ray ' * (k == 'daemons')}{k}", sw.cpu[k], "CPU s")
    _row("other processes (not this benchmark)", sw.others, "cores")


def print_loop(spec: Any, lp: LoopRun, n: int) -> None:
    print(
        f"\nloop ({lp.threads} torch thread{'s' * (lp.threads > 1)}, run_trial one after "
        f"another, the sweep's {n} trials and epochs):"
    )
    _row("setup (MLflow parent run)", lp.setup)
    _row("trials", sum(lp.train))
    _row("finalize stopped trials", lp.finalize)
    _row("loop total", lp.wall)
    _row("per trial (run_trial), mean", sum(lp.train) / n)
    _row("CPU: this process", lp.cpu, "CPU s")
    _row("other processes (not this benchmark)", lp.others, "cores")
    print(f"  same final {spec.objectives[0].metric} as the sweep: {lp.same_metric}/{n} trials")


def print_ratios(sw: SweepRun, total: float, trials: list[Trial], loops: list[LoopRun]) -> None:
    print("\nratios (sweep total includes import ray/optuna, Ray start-up and shutdown):")
    others = max([sw.others] + [lp.others for lp in loops])
    if others > QUIET:
        print(
            f"  warning: other processes used up to {others:.2f} cores during a phase: the wall "
            "ratios are not reliable (a 2-thread loop suffers most); run again on a quiet machine"
        )
    sweep_cpu = sum(sw.cpu.values())
    for lp in loops:
        _row(f"wall: sweep / loop {lp.threads}t", total / lp.wall, "")
        if lp.threads == 1:
            _row("wall: sweep / (loop 1t / 2 cores)", total / (lp.wall / 2), "")
            _row(
                "per trial: Tune time / run_trial 1t",
                sum(t.tune_seconds for t in trials) / sum(lp.train),
                "",
            )
        if sw.cpu.get("daemons"):
            _row(f"CPU s: sweep / loop {lp.threads}t", sweep_cpu / lp.cpu, "")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.file = str(Path(args.file).resolve())  # before the chdir below
    threads = [int(n) for n in args.loop_threads.split(",") if n]
    root = Path(tempfile.mkdtemp(prefix="kdsweep-overhead-"))
    log = root / "output.log"
    cwd = Path.cwd()
    os.chdir(root)  # the sweep file's relative storage (./sweeps, sqlite:///mlflow.db) lands here
    quiet = not args.verbose
    try:
        spec = load_spec(args.file)
        storage = Path(spec.storage.path).expanduser().resolve()
        uri = resolve_tracking_uri(spec.storage.mlflow_tracking_uri)
        print(f"sweep overhead: {args.file}, storage {root}")
        print(
            f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"load average (1 min) {os.getloadavg()[0]:.2f}"
        )
        t = time.perf_counter()
        import sweep.driver  # noqa: F401  (ray, optuna: only the sweep needs them)

        import_s = time.perf_counter() - t
        with redirected(log, quiet):
            warm = warm_teachers(spec, storage, uri)
        print(f"teacher cache warmed before timing (in neither figure): {warm:.1f} s", flush=True)

        t = time.perf_counter()
        with redirected(log, quiet):
            sw = run_sweep_cli(Path(args.file))
        total = time.perf_counter() - t + import_s
        sw.phases = {"import ray, optuna (sweep.driver)": import_s, **sw.phases}
        if sw.exit_code != 0:
            raise SystemExit(f"sweep run exited with {sw.exit_code}; see {log}")
        trials = trials_run(spec, storage / spec.name, sw.results)
        sw.uri = uri
        print_sweep(spec, sw, trials, total)

        loops = []
        for n in threads:
            with redirected(log, quiet):
                loops.append(run_loop(spec, storage, uri, trials, n))
            print_loop(spec, loops[-1], len(trials))
        print_ratios(sw, total, trials, loops)
        print("\na fresh worker process before its first trial (a new Python, 1 thread):")
        for k, v in fresh_process_setup(spec.name, storage).items():
            _row(k, v)
    finally:
        os.chdir(cwd)
        if args.keep:
            print(f"kept {root} (the sweep's and loops' output: {log})")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
