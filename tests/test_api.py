"""A finished run can be reloaded for analysis and reproduces its logged numbers."""

from __future__ import annotations

import pytest
import torch
from conftest import make_context, runs_of, trial_config

from sweep.api import load_run
from sweep.evaluate import accuracy
from sweep.trial import run_trial


def test_load_run_gives_eval_mode_student_teacher_spec_and_test_tensors(tmp_path):
    ctx = make_context(tmp_path)
    run_trial(ctx, trial_config(), lambda m, s: None)
    (run,) = runs_of(ctx)
    r = load_run(run.info.run_id, ctx.tracking_uri)
    assert r.spec == ctx.spec and r.tags["cell"] == "ce.kd.pgd"
    assert not r.student.training and not any(p.requires_grad for p in r.student.parameters())
    n = ctx.spec.evaluation.test_examples
    clean = accuracy(r.student, r.x_test[:n], r.y_test[:n])
    assert clean == pytest.approx(r.metrics["test/clean_acc"])  # the logged number, recomputed
    (teacher,) = r.teachers
    assert not teacher.training
    agree = (teacher(r.x_test[:n]).argmax(1) == r.y_test[:n]).float().mean().item()
    assert agree == pytest.approx(runs_of(ctx, "teacher")[0].data.metrics["test/clean_acc"])
    (t_run,) = runs_of(ctx, "teacher")
    with pytest.raises(ValueError, match="not a student"):
        load_run(t_run.info.run_id, ctx.tracking_uri)
    assert torch.equal(r.y_test, load_run(run.info.run_id, ctx.tracking_uri).y_test)
