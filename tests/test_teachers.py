"""The teacher cache: trained once, found again, corrupt files retrained."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import torch
from torch import nn

from sweep.teachers import TeacherCache, teacher_hash


def _train(model: nn.Module) -> dict:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    return {"val/clean_acc": 0.9}


def test_same_identity_is_trained_once_and_loaded_after(tmp_path):
    cache = TeacherCache(tmp_path)
    calls = []

    def train(m):
        calls.append(1)
        return _train(m)

    seen = []
    ident = {"loss": "ce", "seed": 0}
    r1 = cache.get_or_train(ident, nn.Linear(3, 2), train, lambda r, t: seen.append(t))
    m2 = nn.Linear(3, 2)
    r2 = cache.get_or_train(ident, m2, train, lambda r, t: seen.append(t))
    assert len(calls) == 1 and seen == [True, False]
    assert r1.hash == r2.hash == teacher_hash(ident)
    assert torch.all(m2.weight == 0.5)
    r3 = cache.get_or_train({"loss": "mse", "seed": 0}, nn.Linear(3, 2), train)
    assert r3.hash != r1.hash and len(calls) == 2


def test_corrupt_cached_teacher_is_detected_and_retrained(tmp_path):
    cache = TeacherCache(tmp_path)
    ident = {"loss": "ce"}
    rec = cache.get_or_train(ident, nn.Linear(3, 2), _train)
    data = rec.path.read_bytes()
    rec.path.write_bytes(data[: len(data) // 2])  # truncated
    calls = []
    m = nn.Linear(3, 2)
    cache.get_or_train(ident, m, lambda mm: (calls.append(1), _train(mm))[1])
    assert calls == [1] and torch.all(m.weight == 0.5)


def _worker(root: str, log: str, barrier) -> None:
    barrier.wait()

    def train(m):
        with open(log, "a") as f:
            f.write("trained\n")
        return _train(m)

    TeacherCache(root).get_or_train({"loss": "ce", "shared": True}, nn.Linear(3, 2), train)


def test_processes_starting_together_train_one_teacher(tmp_path):
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(4)
    log = tmp_path / "log.txt"
    procs = [
        ctx.Process(target=_worker, args=(str(tmp_path / "c"), str(log), barrier)) for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert Path(log).read_text().count("trained") == 1
