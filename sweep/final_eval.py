"""`sweep evaluate NAME --top K`: the full suite on the whole test set for the best trials of
each cell, logged into those trials' own MLflow runs under `final/...`.

Why after the sweep: during the sweep each trial is tested on `evaluation.test_examples` (cheap);
a paper reports its finalists on every test example and under the strongest attacks. The best
trials are chosen by the sweep's (validation) objective, never by a test number (DESIGN §3.3).
A run already evaluated is skipped, so an interrupted `sweep evaluate` resumes where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from . import selection
from .api import load_run
from .evaluate import evaluate_suite, sanity_warnings
from .layout import open_sweep
from .spec import AttackRun, SweepSpec
from .tracking import Tracker

PREFIX = "final"


def best_runs(tracker: Tracker, spec: SweepSpec, top: int) -> dict[str, list[Any]]:
    """Per cell, the finished runs of its `top` best configurations by the sweep's one rule
    (selection.py): each configuration's refit on train + validation if it has one, then its
    tuned trial (the run the report names as a cell's best), then its seed repeats."""
    obj = selection.rule(spec)
    by_cell: dict[str, list[Any]] = {}
    for r in tracker.sweep_runs(spec.name, "student", status="FINISHED"):
        by_cell.setdefault(r.data.tags.get("cell", ""), []).append(r)
    refit_of = {
        r.data.tags.get("refit_of"): r
        for r in tracker.sweep_runs(spec.name, "refit", status="FINISHED")
    }
    out: dict[str, list[Any]] = {}
    for cell in spec.cells():
        candidates = selection.from_runs(by_cell.get(cell.key, []), obj, spec.budget.epochs)
        ranked = selection.rank(candidates, obj)[:top]
        runs = [c.ref for r in ranked for c in r.runs]
        # a configuration's refit (spec.refit) goes with it, first: its numbers are the final ones
        out[cell.key] = [
            x for run in runs for x in (refit_of.get(run.info.run_id), run) if x is not None
        ]
    return out


def evaluate_finalists(
    tracker: Tracker,
    spec: SweepSpec,
    *,
    top: int = 1,
    attacks: list[AttackRun] | None = None,
    examples: int | None = None,
    device: str = "cpu",
    force: bool = False,
    state_root: Path | None = None,
) -> list[tuple[str, dict[str, float]]]:
    """Evaluate and log; returns (run id, metrics) for the runs evaluated now. AutoAttack keeps
    its progress under `state_root/<run id>/` and resumes from it."""
    attacks = attacks or list(spec.evaluation.attacks)
    done: list[tuple[str, dict[str, float]]] = []
    chosen = best_runs(tracker, spec, top)
    total = sum(len(v) for v in chosen.values())
    k = 0
    for cell, runs in chosen.items():
        for run in runs:
            k += 1
            rid = run.info.run_id
            if run.data.tags.get("final_eval") == "done" and not force:
                print(f"[{k}/{total}] {cell} {rid[:8]}: already evaluated, skipped", flush=True)
                continue
            start = time.time()
            r = load_run(rid, tracker.uri, device=device, with_teachers=False)
            n = examples or len(r.x_test)
            flags: list[str] = []
            metrics = evaluate_suite(
                r.student,
                r.x_test[:n],
                r.y_test[:n],
                attacks,
                eps=spec.threat.eps,
                norm=spec.threat.norm,
                batch_size=spec.evaluation.batch_size,
                prefix=PREFIX,
                state_dir=state_root / rid if state_root is not None else None,
                flags=flags,
            )
            step = int(run.data.tags.get("epochs_trained", spec.budget.epochs))
            # an evaluation killed after logging, before its done tag: what it logged at this
            # step stays, the rest is logged now, no final/ metric twice (--force: log anew)
            logged = {} if force else tracker.logged_steps(rid)
            tracker.log_metrics(rid, metrics, step=step, logged=logged)
            warnings = flags + sanity_warnings(metrics, attacks, eps=spec.threat.eps, prefix=PREFIX)
            tracker.set_tags(
                rid,
                {
                    "final_eval": "done",
                    "final_examples": str(n),
                    "final_attacks": ",".join(a.key for a in attacks),
                    "final_sanity_warnings": "; ".join(warnings)[:5000] or "none",
                },
            )
            shown = ", ".join(f"{key.split('/', 1)[1]}={v:.4f}" for key, v in metrics.items())
            print(
                f"[{k}/{total}] {cell} {rid[:8]}: {shown} ({n} examples, "
                f"{time.time() - start:.0f}s)",
                flush=True,
            )
            for w in warnings:
                print(f"  warning: {w}", flush=True)
            done.append((rid, metrics))
    return done


def evaluate_sweep(
    name: str,
    storage: str | Path = "./sweeps",
    *,
    top: int = 1,
    attacks: list[str] | None = None,
    examples: int | None = None,
    force: bool = False,
) -> list[tuple[str, dict[str, float]]]:
    """The CLI's entry point: find the sweep's spec and MLflow store from its folder."""
    opened = open_sweep(name, storage)
    spec, state = opened.spec, opened.state
    tracker = Tracker.of_state(state)
    runs = [AttackRun.model_validate(a) for a in attacks] if attacks else None
    device = "cuda" if spec.resources.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu"
    return evaluate_finalists(
        tracker,
        spec,
        top=top,
        attacks=runs,
        examples=examples,
        device=device,
        force=force,
        state_root=opened.layout.final_autoattack_state,
    )
