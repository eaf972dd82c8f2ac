"""Work the driver does with a trial's resources (testing ASHA-stopped trials, training teachers
for a remote cache): Ray tasks on a cluster, this process on an embedded CPU-only Ray."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import ray
import torch
from conftest import make_context, tiny_spec_dict, trial_config

from sweep.driver import _finalize_early_stopped, _trial_slots, _with_trial_resources
from sweep.spec import parse_spec


@pytest.fixture(scope="module")
def local_ray():
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def _ctx(tmp_path, **resources):
    return SimpleNamespace(spec=parse_spec(tiny_spec_dict(tmp_path, resources=resources)))


def _probe():
    """A function Ray ships by value (a closure: this test module is not importable there)."""

    def where(item: int) -> tuple[int, int, int]:
        return item, os.getpid(), torch.get_num_threads()

    return where


def test_on_a_cluster_each_item_is_a_ray_task_with_the_trials_cpus(tmp_path, local_ray):
    out = _with_trial_resources(_ctx(tmp_path, cpus_per_trial=1), _probe(), [1, 2, 3], False)
    assert [o[0] for o in out] == [1, 2, 3]
    assert all(pid != os.getpid() for _, pid, _ in out)
    assert {threads for _, _, threads in out} == {1}


def test_embedded_cpu_only_runs_in_this_process_with_every_cpu(tmp_path, local_ray):
    before = torch.get_num_threads()
    out = _with_trial_resources(_ctx(tmp_path, cpus_per_trial=1), _probe(), [1, 2], True)
    assert out == [(1, os.getpid(), 2), (2, os.getpid(), 2)]
    assert torch.get_num_threads() == before  # restored


def test_trial_slots_follow_the_cluster_and_the_spec(tmp_path, local_ray):
    assert _trial_slots(_ctx(tmp_path, cpus_per_trial=1).spec) == 2
    assert _trial_slots(_ctx(tmp_path, cpus_per_trial=0.5).spec) == 4
    assert _trial_slots(_ctx(tmp_path, cpus_per_trial=0.5, max_concurrent_trials=3).spec) == 3
    assert _trial_slots(_ctx(tmp_path, cpus_per_trial=4).spec) == 1  # waits, never 0


def test_stopped_trials_whose_test_fails_are_recorded_failed_and_the_others_still_tested(
    tmp_path, local_ray
):
    """Two ASHA-stopped trials whose checkpoints are gone: each test fails, each run is marked
    FAILED with the reason, and the first failure does not keep the second from being tried."""
    ctx = make_context(tmp_path)
    tracker, results, runs = ctx.tracker(), [], []
    for k in range(2):
        config = trial_config(number=k, seed=k, hp={})
        runs.append(tracker.start_run(config.label, tags={"kind": "student"}))
        ctx.checkpoints().set_run_id(config.key, runs[-1])
        # what Tune's ResultGrid holds: the config as a dict (the Tune boundary)
        results.append(SimpleNamespace(config=config.to_dict(), error=None, metrics={"epoch": 1}))
    assert _finalize_early_stopped(ctx, results, embedded=True) == 2
    for run_id in runs:
        run = tracker.client.get_run(run_id)
        assert run.info.status == "FAILED"
        assert run.data.tags["failure_reason"].startswith("testing the early-stopped trial failed")
