"""Load a finished run for analysis in a notebook: its student (and teachers) as `nn.Module`s in
eval mode, its resolved sweep spec, and its dataset's test tensors.

Why: numbers that go into a paper should be re-checkable with any tool. Everything needed is in
the MLflow run (the `student.pt` and `sweep.yaml` artifacts, the teacher hashes) and the
teacher cache, so no path on the machine that ran the sweep is needed besides the cache.

    from sweep.api import load_run
    r = load_run("3f2a...", tracking_uri="sqlite:///mlflow.db")
    r.student(r.x_test[:8]).argmax(1), r.spec.threat.eps, r.metrics["test/clean_acc"]
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .context import get_splits, new_model
from .spec import Cell, SweepSpec, parse_spec, read_yaml
from .teachers import TeacherCache, frozen, teacher_hash, teacher_identity
from .tracking import Tracker


@dataclass
class LoadedRun:
    run_id: str
    spec: SweepSpec
    student: nn.Module
    x_test: torch.Tensor
    y_test: torch.Tensor
    teachers: list[nn.Module] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def load_run(
    run_id: str,
    tracking_uri: str = "sqlite:///mlflow.db",
    *,
    device: str | torch.device = "cpu",
    with_teachers: bool = True,
) -> LoadedRun:
    """A finished student run (a tuned trial, a repeat or a refit), ready to evaluate. Teachers
    come from the cache recorded on the sweep's teacher runs (their `cache_location` tag)."""
    tracker, run = Tracker.for_run(tracking_uri, run_id)
    tags = run.data.tags
    if tags.get("kind") not in ("student", "refit"):
        raise ValueError(f"run {run_id} is a {tags.get('kind', 'non-kdsweep')} run, not a student")
    with tempfile.TemporaryDirectory() as d:
        try:
            spec_file = tracker.download_artifact(run_id, "sweep.yaml", d)
            weights = tracker.download_artifact(run_id, "student.pt", d).read_bytes()
        except Exception as e:
            raise FileNotFoundError(
                f"run {run_id} has no student.pt / sweep.yaml artifacts "
                f"(status {run.info.status}: only finished trials have them)"
            ) from e
        where = f"run {run_id}: sweep.yaml"
        spec = parse_spec(read_yaml(spec_file.read_bytes(), where), where)
    device = torch.device(device)
    data = get_splits(spec, device)
    student = new_model(spec.student.arch, data, device)
    student.load_state_dict(torch.load(io.BytesIO(weights), map_location=device, weights_only=True))
    teachers = _load_teachers(tracker, spec, tags, data, device) if with_teachers else []
    return LoadedRun(
        run_id=run_id,
        spec=spec,
        student=frozen(student),
        x_test=data.x_test,
        y_test=data.y_test,
        teachers=teachers,
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags=dict(tags),
    )


def _load_teachers(
    tracker: Tracker, spec: SweepSpec, tags: dict[str, str], data: Any, device: torch.device
) -> list[nn.Module]:
    cell = Cell(tags["teacher_loss"], tags["method"], tags["train_attack"])
    locations = {
        r.data.tags["teacher_hash"]: r.data.tags.get("cache_location", "")
        for r in tracker.sweep_runs(tags.get("sweep", ""), "teacher")
    }
    out = []
    for t in spec.cell_teachers(cell):
        h = teacher_hash(teacher_identity(spec, t))
        if h not in locations:
            raise FileNotFoundError(f"no teacher run with hash {h} ({t.label}) in this experiment")
        model = new_model(t.arch, data, device)
        TeacherCache(locations[h].rsplit("/", 1)[0]).load(h, model)
        out.append(frozen(model))
    return out


__all__ = ["LoadedRun", "load_run"]
