"""The AutoAttack adaptor: at least as strong as our PGD, honest about clean mistakes, leaves the
model as it was, reports the package's sanity checks, and resumes an interrupted evaluation."""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sweep.autoattack import AA_LOGGER, AutoAttackResult, autoattack_eval
from sweep.data import load_splits
from sweep.evaluate import accuracy
from sweep.models import build_model
from sweep.spec import AttackRun

EPS = 0.1
N = 96
CHUNK = 32
# the first FLIPPED test labels are changed: clean mistakes by construction, whatever the model
FLIPPED = 4


def _snapshot(model: nn.Module) -> dict:
    """Everything an evaluation must hand back unchanged."""
    return {
        "state": copy.deepcopy(model.state_dict()),
        "modes": [m.training for m in model.modules()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "rng": torch.get_rng_state(),
    }


def _assert_same(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    assert before["modes"] == after["modes"]
    assert before["requires_grad"] == after["requires_grad"]
    assert torch.equal(before["rng"], after["rng"])  # AutoAttack reseeds it in every attack
    for g0, g1 in zip(before["grads"], after["grads"], strict=True):
        assert (g0 is None and g1 is None) or torch.equal(g0, g1)


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small CNN trained 4 epochs on the bundled digits (seconds on a CPU), handed over the way
    a training loop leaves it: train mode, one submodule in eval, gradients of the last step."""
    torch.manual_seed(0)
    s = load_splits("digits")
    model = build_model(
        "small_cnn", in_channels=1, num_classes=10, mean=s.info.mean, std=s.info.std
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(4):
        perm = torch.randperm(len(s.x_train))
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(s.x_train[idx]), s.y_train[idx]).backward()
            opt.step()
    model[1][1].eval()  # per-module modes must come back as they were, not all train()
    x, y = s.x_test[:N].clone(), s.y_test[:N].clone()
    y[:FLIPPED] = (y[:FLIPPED] + 1) % 10
    return model, x, y


@pytest.fixture(scope="module")
def apgd_run(trained, tmp_path_factory) -> tuple[AutoAttackResult, dict, dict, Path]:
    """One APGD-CE + APGD-T evaluation in chunks of 32, saving its progress."""
    model, x, y = trained
    before = _snapshot(model)
    state = tmp_path_factory.mktemp("aa") / "state.pt"
    result = autoattack_eval(model, x, y, eps=EPS, version="apgd", state_file=state, chunk=CHUNK)
    return result, before, _snapshot(model), state


class _Counting(nn.Module):
    """Counts the examples the model is asked about; with `stop_at`, raises when asked about a
    small batch starting with that example (AutoAttack's first call in the chunk holding it; the
    clean pass sees all examples in one batch), where a pre-empted job would stop."""

    def __init__(self, inner: nn.Module, stop_at: torch.Tensor | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.seen = 0
        self.stop_at = stop_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stop_at is not None and len(x) <= CHUNK and torch.equal(x[0], self.stop_at):
            raise KeyboardInterrupt("pre-empted")
        self.seen += len(x)
        return self.inner(x)


def test_autoattack_finds_at_least_as_many_adversarial_examples_as_pgd20(trained, apgd_run):
    model, x, y = trained
    result = apgd_run[0]
    torch.manual_seed(0)
    pgd = accuracy(model, x, y, attack=AttackRun.model_validate("pgd20"), eps=EPS)
    clean = accuracy(model, x, y)
    assert result.robust.shape == (N,) and result.robust.dtype == torch.bool
    # counts, not fractions, so no rounding can hide a difference
    assert int(result.robust.sum()) <= round(pgd * N)
    assert 0 < int(result.robust.sum()) < int(result.clean_correct.sum())
    assert result.clean_correct.float().mean().item() == pytest.approx(clean)
    acc = result.per_attack_acc
    assert list(acc) == ["clean", "apgd-ce", "apgd-t"]
    assert acc["clean"] == pytest.approx(clean)
    assert acc["clean"] >= acc["apgd-ce"] >= acc["apgd-t"]
    assert acc["apgd-t"] == pytest.approx(result.robust_acc)


def test_a_sound_model_raises_no_flags(apgd_run):
    # AutoAttack's checks and ours (adversarial examples in the eps-ball and in [0, 1])
    assert apgd_run[0].flags == ()


def test_clean_mistakes_are_never_robust(trained, apgd_run):
    model, x, y = trained
    result = apgd_run[0]
    with torch.no_grad():
        expected = model.eval()(x).argmax(1) == y
    model.train()
    model[1][1].eval()
    assert torch.equal(result.clean_correct, expected)
    assert not result.clean_correct[:FLIPPED].any()
    assert not result.robust[:FLIPPED].any()
    assert not (result.robust & ~result.clean_correct).any()


def test_the_model_is_left_exactly_as_it_was(apgd_run):
    _, before, after, _ = apgd_run
    assert before["modes"].count(True) > 1 and False in before["modes"]
    assert all(g is not None for g in before["grads"])
    _assert_same(before, after)


def test_a_finished_evaluation_is_not_run_again(trained, apgd_run):
    model, x, y = trained
    result, _, _, state = apgd_run
    counting = _Counting(model)
    again = autoattack_eval(counting, x, y, eps=EPS, version="apgd", state_file=state, chunk=CHUNK)
    assert counting.seen == N  # the clean pass only
    assert torch.equal(again.robust, result.robust)
    assert again.per_attack_acc == result.per_attack_acc
    assert again.flags == result.flags
    assert again.seconds < result.seconds


def test_an_interrupted_evaluation_resumes_where_it_stopped(trained, apgd_run, tmp_path):
    model, x, y = trained
    result = apgd_run[0]
    before = _snapshot(model)
    state = tmp_path / "state.pt"
    last = (N - 1) // CHUNK * CHUNK
    interrupted = _Counting(model, stop_at=x[last])
    with pytest.raises(KeyboardInterrupt):
        autoattack_eval(interrupted, x, y, eps=EPS, version="apgd", state_file=state, chunk=CHUNK)
    _assert_same(before, _snapshot(model))  # also when interrupted
    assert torch.load(state, weights_only=True)["done"] == list(range(last // CHUNK))
    assert not list(tmp_path.glob("*.tmp"))

    resumed = _Counting(model)
    out = autoattack_eval(resumed, x, y, eps=EPS, version="apgd", state_file=state, chunk=CHUNK)
    assert resumed.seen < interrupted.seen  # one chunk of work left, not three
    assert torch.equal(out.robust, result.robust)  # same seed and chunks: same flags
    assert out.per_attack_acc == result.per_attack_acc
    assert torch.load(state, weights_only=True)["done"] == list(range(N // CHUNK))


def test_a_state_file_of_another_evaluation_is_an_error(trained, apgd_run):
    model, x, y = trained
    state = apgd_run[3]
    with pytest.raises(ValueError, match=r"eps 0\.1 \(file\) vs 0\.2 \(now\)"):
        autoattack_eval(model, x, y, eps=0.2, version="apgd", state_file=state, chunk=CHUNK)
    with pytest.raises(ValueError, match="chunk 32 .*vs 16"):
        autoattack_eval(model, x, y, eps=EPS, version="apgd", state_file=state, chunk=16)
    with pytest.raises(ValueError, match="labels"):
        autoattack_eval(model, x, y.flip(0), eps=EPS, version="apgd", state_file=state, chunk=CHUNK)


def test_standard_suite_runs_all_four_attacks_and_leaves_gradients_alone(trained):
    """FAB calls backward() on the logits: parameter gradients must not change."""
    model, x, y = trained
    eps = 0.15  # fewer survivors of APGD, so FAB-T and Square (5000 queries) stay quick
    xs, ys = x[FLIPPED : FLIPPED + 16], y[FLIPPED : FLIPPED + 16]
    before = _snapshot(model)
    result = autoattack_eval(model, xs, ys, eps=eps, version="standard")
    _assert_same(before, _snapshot(model))
    torch.manual_seed(0)
    pgd = accuracy(model, xs, ys, attack=AttackRun.model_validate("pgd20"), eps=eps)
    assert int(result.robust.sum()) <= round(pgd * len(xs))
    acc = list(result.per_attack_acc.items())
    assert [k for k, _ in acc] == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert all(a >= b for (_, a), (_, b) in zip(acc, acc[1:], strict=False))
    assert acc[-1][1] == pytest.approx(result.robust_acc)
    assert result.flags == ()


def _softmax_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Softmax(dim=1))


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_probability_outputs_are_flagged_and_the_log_is_left_as_it_was():
    model = _softmax_model()
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    logger, root = logging.getLogger(AA_LOGGER), logging.getLogger()
    config = (logger.level, list(logger.handlers), logger.propagate)
    # what logging.basicConfig(level=INFO) sets up: a root handler that takes every level
    seen, root_level = _ListHandler(), root.level
    root.addHandler(seen)
    root.setLevel(logging.INFO)
    try:
        result = autoattack_eval(model, x, y, eps=EPS, version="apgd")
    finally:
        root.removeHandler(seen)
        root.setLevel(root_level)
    assert any("probability distribution" in f for f in result.flags)
    assert (logger.level, list(logger.handlers), logger.propagate) == config
    # the caller still sees the warning where it would have gone, and none of the debug chatter
    ours = [r for r in seen.records if r.name == AA_LOGGER]
    assert any("probability" in r.getMessage() for r in ours)
    assert all(r.levelno >= logging.INFO for r in ours)


def test_fewer_than_four_classes_leaves_out_apgd_t_with_a_flag():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(1))
    result = autoattack_eval(model, x, y, eps=EPS, version="apgd", norm="l2")
    assert list(result.per_attack_acc) == ["clean", "apgd-ce"]
    assert any("apgd-t left out" in f for f in result.flags)


def test_a_tracer_such_as_coverage_survives_the_dynamic_defense_check():
    """AutoAttack's check ends with sys.settrace(None), which would switch coverage off."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(4, dtype=torch.long)

    def tracer(frame, event, arg):  # no per-line tracing: cheap
        return None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        autoattack_eval(model, x, y, eps=EPS, version="apgd")
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(previous)


def test_bad_arguments_are_errors_naming_what_is_allowed():
    model = _softmax_model()
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="'l1'.*allowed: linf, l2"):
        autoattack_eval(model, x, y, eps=EPS, norm="l1")
    with pytest.raises(ValueError, match="'plus'.*allowed: standard, apgd"):
        autoattack_eval(model, x, y, eps=EPS, version="plus")
    with pytest.raises(ValueError, match="num_classes is 5 but the model returns 10"):
        autoattack_eval(model, x, y, eps=EPS, num_classes=5)
