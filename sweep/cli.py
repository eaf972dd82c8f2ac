"""`sweep run | validate | status | evaluate | list | dashboard`.

A bad sweep file exits with status 2 and a message naming the file, the field and what is
allowed, before Ray is imported, let alone started.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # as a shell reports a process ended by SIGINT
# where sweeps live: $KDSWEEP_STORAGE on a cluster (cluster/README.md), else the default path
DEFAULT_STORAGE = os.environ.get("KDSWEEP_STORAGE", "./sweeps")
STORAGE_HELP = "the sweep file's storage.path (default: $KDSWEEP_STORAGE, else ./sweeps)"


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _load(path: str, name: str | None = None) -> Any:
    from .credentials import inline_password_warnings
    from .spec import load_spec, parse_spec, spec_to_dict

    spec = load_spec(path)
    if name:
        spec = parse_spec({**spec_to_dict(spec), "name": name}, path)
    for line in inline_password_warnings(spec.storage):  # validate and run: said once
        print(f"{path}: {line}", file=sys.stderr)
    return spec


def plan(spec: Any) -> str:
    """What `sweep validate` prints: cells, trials, epochs, spaces."""
    from .protocol import protocol_lines
    from .samplers import budget_notes, budget_warnings
    from .samplers import describe as describe_tuning
    from .selection import rule
    from .space import describe
    from .teacher_defs import fmt_value

    cells = spec.cells()
    total = len(cells) * (spec.budget.trials_per_cell + spec.repeats)
    repeats = f" + {spec.repeats} seed repeats of each cell's best" if spec.repeats else ""
    lines = [
        f"sweep {spec.name}: dataset {spec.dataset.name}, student {spec.student.arch}, "
        f"teacher {spec.teacher.arch} ({spec.teacher.epochs} epochs), eps {spec.threat.eps:.4g}",
        f"{len(cells)} cells x {spec.budget.trials_per_cell} trials{repeats} = {total} trials, "
        f"up to {spec.budget.epochs} epochs each "
        + (
            f"(ASHA grace {spec.budget.grace_period})"
            if spec.budget.early_stopping
            else "(no early stopping)"
        ),
        "objective: " + rule(spec).describe(),
        describe_tuning(spec),
        "test suite: clean, " + ", ".join(a.key for a in spec.evaluation.attacks),
        f"resources per trial: {spec.resources.cpus_per_trial} CPU, {spec.resources.gpus_per_trial} GPU"
        f"; compute: precision {spec.compute.precision}, channels_last "
        f"{spec.compute.channels_last}, compile {spec.compute.compile}",
    ]
    teachers = spec.all_teachers()
    if teachers:
        lines.append(f"teachers ({len(teachers)}, each trained once and cached by content):")
        for t in teachers:
            params = ", ".join(f"{k}={fmt_value(v)}" for k, v in t.params) or "-"
            how = {
                "trained": f"{t.epochs} epochs",
                "finetuned": f"fine-tunes {t.init.label} for {t.epochs} epochs" if t.init else "",
                "checkpoint": f"loaded from {t.checkpoint.uri} ({t.checkpoint.format})"
                if t.checkpoint
                else "",
            }[t.source]
            lines.append(f"  {t.label:<28} {t.loss} ({params}) {t.arch}, {how}, seed {t.seed}")
    lines.append("cells (teacher_loss.method.train_attack):")
    for c in cells:
        space = spec.cell_space(c.method)
        shown = ", ".join(f"{k}={describe(v)}" for k, v in space.items()) or "(nothing tuned)"
        lines.append(f"  {c.key:<28} {shown}")
    for dropped, kept in spec.same_cells():
        lines.append(f"  {dropped.key:<28} = {kept.key} (the same loss and attack): run once")
    starts = {}
    for method in dict.fromkeys(c.method for c in cells):
        params, notes = spec.paper_start(method)
        starts[method] = params
        lines += [f"  note: {n}; the first trial samples it" for n in notes]
    shown = "; ".join(
        f"{m} " + ", ".join(f"{k}={fmt_value(v)}" for k, v in p.items())
        for m, p in starts.items()
        if p
    )
    if shown:
        lines.append(f"first trial of each cell, the paper's setting: {shown}")
    lines += [f"warning: {w}" for w in budget_warnings(spec)]
    lines += [f"note: {n}" for n in budget_notes(spec)]
    if spec.refit:
        lines.append(
            "refit: each cell's best configuration is retrained on train + validation for its "
            "final numbers"
        )
    return "\n".join(lines + protocol_lines(spec))


def checkpoint_problems(spec: Any) -> list[str]:
    """Each teacher checkpoint of the sweep (fine-tune parents included) that is missing or
    does not have its pinned sha256."""
    from .checkpoint_formats import CheckpointError
    from .teacher_defs import teacher_generations
    from .teachers import verify_checkpoint

    problems = []
    for generation in teacher_generations(spec.all_teachers()):  # each teacher once
        for t in generation:
            c = t.checkpoint
            if c is None:
                continue
            try:
                verify_checkpoint(c.uri, c.sha256, t.label)
            except (CheckpointError, OSError) as e:
                problems.append(str(e))
    return problems


def cmd_validate(args: argparse.Namespace) -> int:
    from .preflight import check

    spec = _load(args.file)
    check(spec, args.file)  # stores and data reachable, as `sweep run` checks before Ray starts
    print(plan(spec))
    for p in checkpoint_problems(spec):  # the file may live on the cluster only: a note here
        print(f"note: {p}; `sweep run` refuses to start until it is there and pinned")
    print("ok")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    spec = _load(args.file, args.name)
    print(plan(spec), flush=True)
    problems = checkpoint_problems(spec)
    if problems:
        return _fail(f"{args.file}: grid.teacher_loss: " + "\n".join(problems))
    from .driver import NotEnoughResources, SweepExists, run_sweep  # Ray: once the file is good

    try:
        complete = run_sweep(spec, address=args.address)
    except (SweepExists, NotEnoughResources) as e:
        return _fail(str(e))
    return 0 if complete else EXIT_INTERRUPTED


def _storage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with `--storage` (unknown scheme, missing bucket), before anything opens
    it: the commands that open a sweep say it as an error, not a traceback."""
    from .preflight import location_problem

    problem = location_problem(args.storage)
    return f"--storage: {problem}" if problem else None


def cmd_resume(args: argparse.Namespace) -> int:
    if problem := _storage_problem(args):
        return _fail(problem)
    from .driver import resume_sweep
    from .status import SweepRunning

    try:
        complete = resume_sweep(args.name, args.storage, address=args.address)
    except (FileNotFoundError, SweepRunning) as e:
        return _fail(str(e))
    return 0 if complete else EXIT_INTERRUPTED


def cmd_report(args: argparse.Namespace) -> int:
    if problem := _storage_problem(args):
        return _fail(problem)
    from .report import write_report

    try:
        summary = write_report(args.name, args.storage, out=args.out)
    except FileNotFoundError as e:
        return _fail(str(e))
    print(summary)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if problem := _storage_problem(args):
        return _fail(problem)
    from sqlalchemy.exc import OperationalError

    from .status import SweepRunning, sweep_status

    try:
        print(sweep_status(args.name, args.storage, fix=args.fix))
    except (FileNotFoundError, SweepRunning) as e:
        return _fail(str(e))
    except OperationalError as e:  # the sweep's Optuna database refuses us (not an outage)
        return _fail(f"the sweep's Optuna storage: {str(e).splitlines()[0][:300]}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if problem := _storage_problem(args):
        return _fail(problem)
    from pydantic import ValidationError

    from .final_eval import evaluate_sweep  # MLflow: once the arguments are good

    try:
        done = evaluate_sweep(
            args.name,
            args.storage,
            top=args.top,
            attacks=args.attacks,
            examples=args.examples,
            force=args.force,
        )
    except FileNotFoundError as e:
        return _fail(str(e))
    except ValidationError as e:
        return _fail(f"--attacks: {e.errors()[0]['msg']}")
    print(f"evaluated {len(done)} runs; metrics final/... in their MLflow runs")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    # no _storage_problem here: it loads torch and pyarrow, and with them loaded the server
    # did not exit on Ctrl-C in two full CI runs (test_dashboard); open_sweep and the
    # dashboard's own errors already name a bad --storage
    from .dashboard import DashboardError, dashboard

    try:
        dashboard(args.name, args.storage, host=args.host, port=args.port)
    except (FileNotFoundError, DashboardError) as e:
        return _fail(str(e))
    return 0


def _attack_listing(a: Any) -> dict[str, Any]:
    """A training attack: its training protocol (the sweep file's `train_attack.<name>` changes
    it), its evaluation step when the file sets none, and its own parameters."""

    def rule(steps: int | None, step: Any) -> str | None:
        if step is None:
            return None
        return (f"{steps} x " if steps else "1 x ") + step.describe()

    return {
        "summary": a.summary,
        "iterative": a.iterative,
        "norms": list(a.norms),
        "training": rule(a.train_steps, a.train_step),
        "evaluation_step": a.eval_step.describe() if a.eval_step else None,
        "params": {
            k: {
                "default": p.default,
                "low": p.low,
                "high": p.high,
                "doc": p.doc,
                "training": p.training,
            }
            for k, p in a.params.items()
        },
    }


def registry_listing() -> dict[str, Any]:
    from .attacks import ATTACKS
    from .data import DATASETS
    from .evaluate import EVAL_ATTACKS
    from .methods import METHODS
    from .models import MODELS
    from .spec import AttackRun
    from .teacher_losses import TEACHER_LOSSES

    def option(field: str, doc: str) -> dict[str, Any]:
        return {"default": AttackRun.model_fields[field].default, "doc": doc}

    return {
        "datasets": {
            n: {"classes": d.num_classes, "shape": list(d.shape), "bundled": d.bundled}
            for n, d in DATASETS.items()
        },
        "models": MODELS.names(),
        "teacher_losses": {n: t.describe() for n, t in TEACHER_LOSSES.items()},
        "methods": {n: m.describe() for n, m in METHODS.items()},
        "attacks": {n: _attack_listing(a) for n, a in ATTACKS.items()},
        # evaluation.attacks only (never a train_attack nor the per-epoch val_attack)
        "evaluation_attacks": {
            n: {
                "summary": a.summary,
                "norms": list(a.norms),
                "options": {k: option(k, doc) for k, doc in a.options.items()},
                "variants": {v: dict(values) for v, values in a.variants.items()},
            }
            for n, a in EVAL_ATTACKS.items()
        },
    }


def _print_fidelity(f: dict[str, Any]) -> None:
    """How a method or teacher loss was checked, and its known departures (fidelity.py)."""
    pad = " " * 19
    print(f"{pad}fidelity: {f['checked']} ({f['meaning']}); source: {f['source']}")
    for d in f["departures"]:
        print(f"{pad}  departs: {d}")


def cmd_list(args: argparse.Namespace) -> int:
    from .teacher_defs import fmt_value

    listing = registry_listing()
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    for kind, items in listing.items():
        print(f"{kind}:")
        if isinstance(items, list):
            print("  " + ", ".join(items))
            continue
        for name, info in items.items():
            print(f"  {name:<16} {info.get('summary', '') if isinstance(info, dict) else info}")
            if kind == "teacher_losses":
                for pname, p in info["params"].items():
                    close = ")" if p["high_open"] else "]"
                    bounds = f"[{fmt_value(p['low'])}, {fmt_value(p['high'])}{close}"
                    default = "threat.eps" if pname == "eps" else fmt_value(p["default"])
                    print(f"  {'':<16} {pname + '=' + default:<22} {bounds:<10} {p['doc']}")
                if info.get("adversarial"):
                    print(f"  {'':<16} (adversarial training)")
            if kind == "methods":
                print(f"  {'':<16} teachers={info['teachers']} inner_max={info['inner_max']!r}")
                for pname, rng in info["space"].items():
                    paper = info["paper_default"].get(pname)
                    shown = f"paper {fmt_value(paper)}" if paper is not None else "paper -"
                    print(f"  {'':<16} {pname:<22} {rng!s:<14} {shown}")
            if "fidelity" in info:
                _print_fidelity(info["fidelity"])
            if kind == "attacks" and info["training"]:
                print(
                    f"  {'':<16} training: {info['training']}; evaluation step: "
                    f"{info['evaluation_step']}"
                )
                for pname, p in info["params"].items():
                    where = "" if p["training"] else " (evaluation objective only)"
                    print(
                        f"  {'':<16} {pname + '=' + fmt_value(p['default']):<22} {p['doc']}{where}"
                    )
            if kind == "evaluation_attacks":
                for oname, o in info["options"].items():
                    default = fmt_value(o["default"]) if o["default"] is not None else "null"
                    print(f"  {'':<16} {oname + '=' + default:<22} {o['doc']}")
                for vname, values in info["variants"].items():
                    shown = ", ".join(f"{k}: {v}" for k, v in values.items())
                    print(f"  {'':<16} {vname:<22} = {{name: {name}, {shown}}}")
    return 0


def _positive(text: str) -> int:
    """An argparse type: a whole number >= 1 (`--top 0` evaluates nothing, `--top -1` all but
    the worst run: both refused, with status 2)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number; allowed: 1 or more"
        ) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}; allowed: 1 or more")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sweep", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a sweep file")
    r.add_argument("file")
    r.add_argument(
        "--address", help="Ray cluster address (default: RAY_ADDRESS, else embedded Ray)"
    )
    r.add_argument("--name", help="run under another name than the file's")
    r.set_defaults(fn=cmd_run)
    rs = sub.add_parser("resume", help="continue a stopped sweep from its checkpoints")
    rs.add_argument("name")
    rs.add_argument("--storage", default=DEFAULT_STORAGE, help=STORAGE_HELP)
    rs.add_argument(
        "--address", help="Ray cluster address (default: RAY_ADDRESS, else embedded Ray)"
    )
    rs.set_defaults(fn=cmd_resume)
    rp = sub.add_parser(
        "report", help="tables and plots of a sweep (also logged to its MLflow parent run)"
    )
    rp.add_argument("name")
    rp.add_argument("--storage", default=DEFAULT_STORAGE, help=STORAGE_HELP)
    rp.add_argument("--out", help="output folder (default: <storage>/<name>/report)")
    rp.set_defaults(fn=cmd_report)
    v = sub.add_parser("validate", help="check a sweep file and print its plan")
    v.add_argument("file")
    v.set_defaults(fn=cmd_validate)
    s = sub.add_parser("status", help="per cell: trials done / running / failed, best so far")
    s.add_argument("name")
    s.add_argument("--storage", default=DEFAULT_STORAGE, help=STORAGE_HELP)
    s.add_argument(
        "--fix",
        action="store_true",
        help="close the RUNNING MLflow runs and Optuna trials a dead driver left (refused while "
        "the sweep's driver runs)",
    )
    s.set_defaults(fn=cmd_status)
    e = sub.add_parser(
        "evaluate", help="full test-set suite for the best trials of each cell, into their runs"
    )
    e.add_argument("name")
    e.add_argument(
        "--top", type=_positive, default=1, help="trials per cell, by the sweep's objective"
    )
    e.add_argument("--storage", default=DEFAULT_STORAGE, help=STORAGE_HELP)
    e.add_argument("--attacks", nargs="+", help="e.g. pgd50 cw_inf30 (default: the file's suite)")
    e.add_argument("--examples", type=_positive, help="test examples (default: all)")
    e.add_argument("--force", action="store_true", help="re-evaluate runs already evaluated")
    e.set_defaults(fn=cmd_evaluate)
    d = sub.add_parser(
        "dashboard", help="optuna-dashboard on a sweep's Optuna studies (read-only, loopback)"
    )
    d.add_argument("name")
    d.add_argument("--storage", default=DEFAULT_STORAGE, help=STORAGE_HELP)
    d.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1; the dashboard has no authentication)",
    )
    d.add_argument("--port", type=int, default=8080, help="(default: 8080)")
    d.set_defaults(fn=cmd_dashboard)
    ls = sub.add_parser(
        "list", help="registered datasets, models, teacher losses, methods, attacks"
    )
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    from .spec import SpecError

    args = parser().parse_args(argv)
    if not (getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")):
        # an embedded Ray listens on loopback only; Ray reads this when it is imported, so here,
        # before any command imports it (DESIGN §3.8), not in driver.init_ray
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        return args.fn(args)
    except SpecError as e:
        print(f"error: {e}".replace("\n", "\nerror: "), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
