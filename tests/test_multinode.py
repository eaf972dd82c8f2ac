"""A real two-node Ray cluster on 127.0.0.1 (issue 7): trials on both nodes, one node stopped
mid-sweep, its trials finished from their checkpoints on the other. Plus the resource check.

`ray.cluster_utils.Cluster` starts a head and a second raylet with resources of its own, as
separate processes on loopback (DESIGN §3.8); the sweep joins it by address, like a cluster.
"""

from __future__ import annotations

import threading
import time

import optuna
import pytest
import ray
import yaml
from conftest import sweep_cli, tiny_spec_dict
from ray.cluster_utils import Cluster

from sweep.driver import run_sweep
from sweep.spec import parse_spec
from sweep.tracking import Tracker

EPOCHS = 4


@pytest.fixture
def two_nodes():
    ray.shutdown()  # the sweep must join this cluster, not a Ray this process started before
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"},
    )
    worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


def _student_runs(tracker: Tracker, sweep: str = "twonodes") -> list:
    return tracker.sweep_runs(sweep, "student")


def _stop_worker_node_mid_trial(cluster, worker, spec, tracker_uri, seen: dict) -> None:
    """Wait until trials run on both nodes and one on the second node has logged an epoch
    (so it has a checkpoint), note the nodes, then take the second node away."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            runs = _student_runs(Tracker(tracker_uri, spec.name), spec.name)
        except Exception:  # the experiment does not exist yet
            runs = []
        nodes = {x.data.tags.get("ray_node_id") for x in runs} - {None}
        if len(nodes) < 2:  # a trial waiting for the teacher has no run yet
            time.sleep(0.25)
            continue
        for r in runs:
            on_worker = r.data.tags.get("ray_node_id") == worker.node_id
            if on_worker and r.info.status == "RUNNING" and "val/clean_acc" in r.data.metrics:
                seen["nodes"] = nodes
                seen["run_id"] = r.info.run_id
                cluster.remove_node(worker)
                return
        time.sleep(0.25)
    seen["timeout"] = True


def test_a_sweep_on_two_nodes_survives_losing_one(tmp_path, two_nodes):
    cluster, worker = two_nodes
    data = tiny_spec_dict(
        tmp_path,
        name="twonodes",
        teacher={"epochs": 1},
        grid={"teacher_loss": ["ce"], "method": ["kd"], "train_attack": ["pgd"]},
        budget={"trials_per_cell": 3, "epochs": EPOCHS, "grace_period": EPOCHS},
        evaluation={"attacks": ["pgd5"], "val_attack": "pgd3", "val_examples": 60},
    )
    spec = parse_spec(data)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    seen: dict = {}
    stopper = threading.Thread(
        target=_stop_worker_node_mid_trial, args=(cluster, worker, spec, uri, seen)
    )
    stopper.start()
    assert run_sweep(spec, address=cluster.address)
    stopper.join()
    assert "timeout" not in seen, "no trial ever ran on the second node"

    # trials ran on both nodes (seen while both were up)
    assert worker.node_id in seen["nodes"] and len(seen["nodes"]) == 2
    tracker = Tracker(uri, "twonodes")
    runs = _student_runs(tracker)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    # the trial that lost its node finished on the head, in the same run, from its checkpoint
    moved = tracker.client.get_run(seen["run_id"])
    assert moved.data.tags["ray_node_id"] in seen["nodes"] - {worker.node_id}
    assert int(moved.data.tags["resumed_from_epoch"]) >= 1
    steps = [m.step for m in tracker.client.get_metric_history(moved.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, EPOCHS + 1))
    # everything landed in the shared places: checkpoints, Optuna, MLflow
    sweep_dir = tmp_path / "sweeps" / "twonodes"
    assert len(list((sweep_dir / "trials").glob("*/*/state.pt"))) == 3
    study = optuna.load_study(
        study_name="twonodes/ce.kd.pgd", storage=f"sqlite:///{sweep_dir}/optuna.db"
    )
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3


def test_asking_for_more_gpus_than_any_node_has_is_refused_before_anything_starts(tmp_path):
    data = tiny_spec_dict(tmp_path, name="greedy", resources={"gpus_per_trial": 1})
    path = tmp_path / "greedy.yaml"
    path.write_text(yaml.safe_dump(data))
    r = sweep_cli(tmp_path, "run", str(path), env={"CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resources.gpus_per_trial is 1 but no node has more than 0 GPUs" in r.stderr
    assert "CUDA_VISIBLE_DEVICES=''" in r.stderr
    assert not (tmp_path / "sweeps" / "greedy").exists()  # nothing was started or written


def test_a_gpu_amount_ray_cannot_schedule_is_a_spec_error(tmp_path):
    from sweep.spec import SpecError

    with pytest.raises(SpecError, match="gpus_per_trial.*fraction below 1"):
        parse_spec(tiny_spec_dict(tmp_path, resources={"gpus_per_trial": 1.5}))
    assert parse_spec(tiny_spec_dict(tmp_path, resources={"gpus_per_trial": 0.25}))
