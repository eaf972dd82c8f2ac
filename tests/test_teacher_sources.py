"""End to end: a sweep whose grid loads one teacher from a checkpoint file and fine-tunes another
from its parent, through the CLI, real Ray, Optuna and MLflow (DESIGN §3; issue 17)."""

from __future__ import annotations

import hashlib

import pytest
import torch
import yaml
from conftest import sweep_cli, tiny_spec_dict
from mlflow.tracking import MlflowClient

from sweep.context import get_splits, new_model
from sweep.spec import parse_spec

pytestmark = pytest.mark.integration


def _checkpoint(tmp_path, spec_dict) -> tuple[str, str]:
    """A small_cnn for the sweep's dataset, initialised (not trained: loading is the point)."""
    cpu = torch.device("cpu")
    data = get_splits(parse_spec(spec_dict), cpu)
    torch.manual_seed(7)
    path = tmp_path / "users_teacher.pt"
    torch.save(new_model("small_cnn", data, cpu).state_dict(), path)
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_sweep_with_a_loaded_and_a_fine_tuned_teacher_records_where_each_came_from(tmp_path):
    grid = {"teacher_loss": ["ce"], "method": ["kd"], "train_attack": ["none"]}
    spec = tiny_spec_dict(
        tmp_path,
        grid=grid,
        teacher={"epochs": 1},
        budget={"trials_per_cell": 1, "epochs": 1, "grace_period": 1},
        evaluation={
            "attacks": ["fgsm"],
            "val_attack": "pgd5",
            "val_examples": 50,
            "test_examples": 50,
        },
    )
    uri, sha = _checkpoint(tmp_path, spec)
    spec["grid"]["teacher_loss"] = [
        {"name": "ce", "label": "users", "checkpoint": {"uri": uri, "sha256": sha}},
        {
            "name": "mse",
            "label": "mse_ft",
            "finetune": {"from": "ce", "epochs": 1, "optim": {"lr": 0.01}},
        },
    ]
    (tmp_path / "sources.yaml").write_text(yaml.safe_dump(spec))
    r = sweep_cli(tmp_path, "run", "sources.yaml")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    (parent,) = client.search_runs([exp.experiment_id], "tags.kind = 'sweep'")
    assert parent.info.status == "FINISHED"
    students = client.search_runs([exp.experiment_id], "tags.kind = 'student'")
    assert {s.data.tags["cell"] for s in students} == {"users.kd.none", "mse_ft.kd.none"}
    assert all(s.info.status == "FINISHED" for s in students)

    teachers = {
        t.data.tags["teacher_label"]: t
        for t in client.search_runs([exp.experiment_id], "tags.kind = 'teacher'")
    }
    # the fine-tune's parent was made for it, once, with a run of its own
    assert set(teachers) == {"users", "mse_ft", "ce"}
    users, ft, ce = teachers["users"].data, teachers["mse_ft"].data, teachers["ce"].data
    assert users.tags["source"] == "checkpoint" and users.tags["cache_event"] == "loaded"
    assert ft.tags["cache_event"] == "trained"
    assert users.tags["checkpoint_sha256"] == sha and users.tags["checkpoint_uri"] == uri
    assert users.tags["checkpoint_format"] == "state_dict"
    assert "val/clean_acc" in users.metrics  # measured like any teacher
    assert ft.tags["source"] == "finetuned" and ce.tags["source"] == "trained"
    assert ft.tags["finetuned_from"] == f"ce:{ce.tags['teacher_hash']}"
    assert ft.params["finetuned_from.loss"] == "ce" and ft.params["optim.lr"] == "0.01"
    # each student run used its cell's teacher
    by_cell = {s.data.tags["cell"]: s.data.tags["teacher_hash"] for s in students}
    assert by_cell["users.kd.none"] == users.tags["teacher_hash"]
    assert by_cell["mse_ft.kd.none"] == ft.tags["teacher_hash"]


def test_a_missing_or_unpinned_checkpoint_stops_sweep_run_before_any_trial(tmp_path):
    spec = tiny_spec_dict(tmp_path, name="pinned")
    path, sha = _checkpoint(tmp_path, spec)
    wrong = "0" * 64
    spec["grid"] = {
        "teacher_loss": [{"name": "ce", "checkpoint": {"uri": path, "sha256": wrong}}],
        "method": ["kd"],
        "train_attack": ["pgd"],
    }
    (tmp_path / "pinned.yaml").write_text(yaml.safe_dump(spec))
    # validate is a static check (the file may live on the cluster only): a note, exit 0
    out = sweep_cli(tmp_path, "validate", "pinned.yaml")
    assert out.returncode == 0 and f"has sha256 {sha}, the sweep file expects {wrong}" in out.stdout
    # run refuses before Ray starts: nothing is written, no trial runs
    out = sweep_cli(tmp_path, "run", "pinned.yaml")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "pinned.yaml: grid.teacher_loss: teacher" in out.stderr and sha in out.stderr
    assert not (tmp_path / "sweeps" / "pinned").exists()
    (tmp_path / "users_teacher.pt").unlink()
    out = sweep_cli(tmp_path, "run", "pinned.yaml")
    assert out.returncode == 2 and f"no file at {path}" in out.stderr
