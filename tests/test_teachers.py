"""The teacher cache: trained once, found again, corrupt files retrained and the event kept."""

from __future__ import annotations

import dataclasses
import hashlib
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


# --- where a teacher starts: a checkpoint file, or its parent's weights -------------------------
def _ctx(tmp_path, teacher_loss, **over):
    from conftest import make_context, tiny_spec_dict

    from sweep.spec import parse_spec

    grid = {"teacher_loss": teacher_loss, "method": ["kd"], "train_attack": ["pgd"]}
    return make_context(tmp_path, parse_spec(tiny_spec_dict(tmp_path, grid=grid, **over)))


def _save(state: dict, path: Path) -> str:
    torch.save(state, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Marker:
    """Unpickling this (without weights_only) would create a file: proof that nothing ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_checkpoint_teacher_loads_with_its_sha256_and_is_recorded_as_such(tmp_path):
    from conftest import runs_of

    from sweep.context import get_splits, new_model
    from sweep.teachers import get_teacher

    cpu = torch.device("cpu")
    probe = _ctx(tmp_path, ["ce"])
    data = get_splits(probe.spec, cpu)
    torch.manual_seed(123)
    mine = new_model("small_cnn", data, cpu)
    path = tmp_path / "mine.pt"
    sha = _save(mine.state_dict(), path)
    entry = {"name": "ce", "label": "mine", "checkpoint": {"uri": path.as_uri(), "sha256": sha}}
    ctx = _ctx(tmp_path, [entry])
    (t,) = ctx.spec.teacher_variants().values()
    model, rec = get_teacher(ctx, t, data, cpu)
    for a, b in zip(model.state_dict().values(), mine.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert rec.event == "loaded" and "val/clean_acc" in rec.metrics  # measured and cached
    (run,) = runs_of(ctx, "teacher")
    tags, params = run.data.tags, run.data.params
    assert tags["source"] == params["source"] == "checkpoint"
    assert tags["checkpoint_sha256"] == sha and tags["checkpoint_format"] == "state_dict"
    assert tags["checkpoint_uri"] == path.as_uri()
    # moved: the same teacher, from the cache (the file is not even read)
    moved = tmp_path / "moved.pt"
    path.rename(moved)
    entry2 = entry | {"checkpoint": {"uri": str(moved), "sha256": sha}}
    ctx2 = _ctx(tmp_path, [entry2])
    (t2,) = ctx2.spec.teacher_variants().values()
    _, rec2 = get_teacher(ctx2, t2, data, cpu)
    assert rec2.event == "cached" and rec2.hash == rec.hash


def test_a_checkpoint_with_other_bytes_is_refused_before_anything_is_unpickled(tmp_path):
    from sweep.checkpoint_formats import CheckpointError
    from sweep.teachers import load_checkpoint

    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    sha = _save({"x": _Marker(str(marker))}, path)
    wrong = "0" * 64
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(nn.Linear(2, 2), uri=str(path), sha256=wrong, fmt="state_dict", who="t1")
    msg = str(err.value)
    assert "t1" in msg and sha in msg and wrong in msg and "nothing was unpickled" in msg
    assert not marker.exists()
    # the right sha256 still never runs code: weights_only refuses the object
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        load_checkpoint(nn.Linear(2, 2), uri=str(path), sha256=sha, fmt="state_dict", who="t1")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="no file"):
        load_checkpoint(
            nn.Linear(2, 2), uri=str(tmp_path / "none.pt"), sha256=sha, fmt="state_dict", who="t1"
        )


def test_a_checkpoint_of_another_model_is_refused_naming_the_keys(tmp_path):
    from sweep.checkpoint_formats import CheckpointError
    from sweep.teachers import load_checkpoint

    path = tmp_path / "lin.pt"
    sha = _save(nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit.*missing"):
        load_checkpoint(
            nn.Linear(2, 2, bias=False), uri=str(path), sha256=sha, fmt="state_dict", who="t"
        )
    with pytest.raises(CheckpointError, match="size mismatch"):
        load_checkpoint(nn.Linear(2, 2), uri=str(path), sha256=sha, fmt="state_dict", who="t")


def test_robustbench_wide_resnet_keys_map_onto_ours_with_identity_normalisation(tmp_path):
    from sweep.checkpoint_formats import to_robustbench
    from sweep.models import build_model
    from sweep.teachers import load_checkpoint

    torch.manual_seed(0)
    ours = build_model("wrn34_10", in_channels=3, num_classes=10, mean=(0.0,) * 3, std=(1.0,) * 3)
    with torch.no_grad():  # non-trivial batch-norm statistics, so that they must be carried
        for m in ours.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    rb = to_robustbench(ours.state_dict())
    # RobustBench's WideResNet parameter names (model_zoo/architectures/wide_resnet.py)
    for key in (
        "conv1.weight",
        "block1.layer.0.bn1.running_var",
        "block1.layer.0.convShortcut.weight",
        "block2.layer.0.convShortcut.weight",
        "block3.layer.4.conv2.weight",
        "bn1.weight",
        "fc.bias",
    ):
        assert key in rb, key
    assert "block1.layer.1.convShortcut.weight" not in rb and "0.mean" not in rb
    # Zhang2019Theoretically has sub_block1 (unused in its forward); DataParallel adds module.
    rb |= {
        k.replace("block1.", "sub_block1.", 1): v for k, v in rb.items() if k.startswith("block1.")
    }
    saved = {"state_dict": {f"module.{k}": v for k, v in rb.items()}}
    path = tmp_path / "Zhang2019Theoretically.pt"
    sha = _save(saved, path)
    # a model built with CIFAR normalisation: the loaded teacher must not normalise
    theirs = build_model(
        "wrn34_10", in_channels=3, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3
    )
    load_checkpoint(theirs, uri=str(path), sha256=sha, fmt="robustbench", who="trades_wrn")
    assert torch.equal(theirs[0].mean, torch.zeros(1, 3, 1, 1))
    assert torch.equal(theirs[0].std, torch.ones(1, 3, 1, 1))
    x = torch.rand(2, 3, 32, 32)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_a_fine_tuned_teacher_starts_from_its_parents_weights(tmp_path):
    from conftest import runs_of

    from sweep.context import get_splits
    from sweep.teachers import get_teacher, teacher_hash, teacher_identity

    cpu = torch.device("cpu")
    still = {"lr": 1e-12, "momentum": 0.0, "weight_decay": 0.0}  # the first step barely moves
    entry = {
        "name": "mse",
        "label": "ft",
        "finetune": {"from": {"name": "ce", "epochs": 1}, "epochs": 1, "optim": still},
    }
    ctx = _ctx(tmp_path, [entry])
    data = get_splits(ctx.spec, cpu)
    (t,) = ctx.spec.teacher_variants().values()
    child, rec = get_teacher(ctx, t, data, cpu)
    parent, prec = get_teacher(ctx, t.init, data, cpu)
    assert rec.event == "trained" and prec.event == "cached"  # made for the child, once
    scratch, _ = get_teacher(
        ctx, dataclasses.replace(t, label="scratch", init=None, optim=None), data, cpu
    )
    for name, p in parent.named_parameters():
        c = dict(child.named_parameters())[name]
        assert torch.allclose(c, p, atol=1e-6), name
    assert not all(
        torch.allclose(a, b) for a, b in zip(scratch.parameters(), parent.parameters(), strict=True)
    )
    runs = {r.data.tags["teacher_label"]: r for r in runs_of(ctx, "teacher")}
    assert set(runs) == {"ft", "ce", "scratch"}
    h = teacher_hash(teacher_identity(ctx.spec, t.init))
    assert runs["ft"].data.tags["source"] == "finetuned"
    assert runs["ft"].data.tags["finetuned_from"] == f"ce:{h}"
    assert runs["ce"].data.tags["source"] == "trained" and runs["ce"].data.tags["teacher_hash"] == h
    assert rec.identity["finetuned_from"] == prec.identity
    # asked again, the fine-tuned teacher comes from the cache without its parent
    _, again = get_teacher(ctx, t, data, cpu)
    assert again.event == "cached"


def test_mcmi_by_its_recipe_fine_tunes_a_ce_teacher_with_the_recipes_settings(tmp_path):
    from conftest import runs_of

    from sweep.context import get_splits
    from sweep.teachers import get_teacher

    cpu = torch.device("cpu")
    ctx = _ctx(tmp_path, [{"name": "mcmi", "finetune": {"epochs": 1}}], teacher={"epochs": 1})
    data = get_splits(ctx.spec, cpu)
    (t,) = ctx.spec.teacher_variants().values()
    _, rec = get_teacher(ctx, t, data, cpu)
    assert rec.identity["optim"]["batch_size"] == 64 and rec.identity["optim"]["lr"] == 0.05
    assert rec.identity["finetuned_from"]["loss"] == "ce"
    assert rec.identity["dataset"]["crop_padding"] == "zeros"
    runs = {r.data.tags["teacher_label"]: r.data for r in runs_of(ctx, "teacher")}
    assert runs["mcmi"].tags["source"] == "finetuned" and runs["mcmi"].params["loss"] == "mcmi"
    assert runs["ce"].tags["source"] == "trained"
