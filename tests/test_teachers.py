"""The teacher cache: trained once, found again, corrupt files retrained and the event kept."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest
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
    r1 = cache.get_or_train(ident, nn.Linear(3, 2), train, lambda r: seen.append(r.event))
    m2 = nn.Linear(3, 2)
    r2 = cache.get_or_train(ident, m2, train, lambda r: seen.append(r.event))
    assert len(calls) == 1 and seen == ["trained", "cached"]
    assert r1.hash == r2.hash == teacher_hash(ident)
    assert torch.all(m2.weight == 0.5)
    r3 = cache.get_or_train({"loss": "mse", "seed": 0}, nn.Linear(3, 2), train)
    assert r3.hash != r1.hash and len(calls) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "bad_meta", "delete_meta"])
@pytest.mark.parametrize("uri", [False, True])
def test_damaged_cached_teacher_is_detected_retrained_and_logged(tmp_path, damage, uri):
    root = (tmp_path / "c").as_uri() if uri else str(tmp_path / "c")  # pyarrow path or local
    cache = TeacherCache(root)
    ident = {"loss": "ce"}
    rec = cache.get_or_train(ident, nn.Linear(3, 2), _train)
    weights = tmp_path / "c" / rec.hash / "teacher.pt"
    meta = tmp_path / "c" / rec.hash / "meta.json"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":  # same length, same pickle framing: only the checksum sees it
        weights.write_bytes(data[:-20] + bytes([data[-20] ^ 1]) + data[-19:])
    elif damage == "bad_meta":
        meta.write_text("{not json")
    else:
        meta.unlink()
    calls = []
    m = nn.Linear(3, 2)
    got = cache.get_or_train(ident, m, lambda mm: (calls.append(1), _train(mm))[1])
    assert calls == [1] and torch.all(m.weight == 0.5)
    assert got.event == "retrained" and got.problem
    history = json.loads(meta.read_text())["history"]
    assert history[-1]["event"] == "retrained" and history[-1]["problem"] == got.problem
    if damage in ("truncate", "flip_byte"):
        assert "checksum" in got.problem
        assert [h["event"] for h in history] == ["trained", "retrained"]
    again = cache.get_or_train(ident, nn.Linear(3, 2), lambda mm: 1 / 0)  # must not train
    assert again.event == "cached"


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
