"""Robust accuracy is counted honestly, and suspicious numbers are flagged."""

from __future__ import annotations

import torch
from torch import nn

from sweep.evaluate import accuracy, robust_mask, sanity_warnings
from sweep.spec import AttackRun


class _Threshold(nn.Module):
    """Class 1 iff the mean pixel exceeds 0.5: any eps-ball crossing 0.5 flips it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1, keepdim=True) - 0.5
        return torch.cat([-m, m], dim=1) * 100


class _Counting(nn.Module):
    """Counts how many inputs it is asked about, to see which examples later restarts attack."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0
        self.inner = _Threshold()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return self.inner(x)


def _data():
    x = torch.tensor([0.1, 0.45, 0.55, 0.9, 0.2]).view(5, 1, 1, 1).expand(5, 1, 2, 2).clone()
    y = torch.tensor([0, 0, 1, 1, 1])  # the last one is misclassified clean
    return x, y


def test_robust_counts_clean_mistakes_as_not_robust_and_follows_eps():
    x, y = _data()
    model = _Threshold()
    assert accuracy(model, x, y) == 0.8
    pgd = AttackRun.model_validate("pgd10")
    # eps 0.1 flips the two examples within 0.1 of the threshold; the clean mistake stays wrong
    # even though an attack could "fix" it
    assert robust_mask(model, x, y, pgd, eps=0.1).tolist() == [True, False, False, True, False]
    assert accuracy(model, x, y, attack=pgd, eps=0.1) == 0.4
    assert accuracy(model, x, y, attack=pgd, eps=0.0) == 0.8
    per_attack = AttackRun.model_validate({"name": "pgd", "steps": 10, "eps": 0.5})
    assert per_attack.key == "pgd10@0.5"
    assert accuracy(model, x, y, attack=per_attack, eps=0.1) == 0.0  # its own eps wins


def test_restarts_attack_only_the_survivors_and_never_raise_accuracy():
    x, y = _data()
    model = _Counting()
    once = AttackRun.model_validate({"name": "pgd", "steps": 1})
    thrice = AttackRun.model_validate({"name": "pgd", "steps": 1, "restarts": 3})
    assert thrice.key == "pgd1_r3"
    a1 = accuracy(model, x, y, attack=once, eps=0.1)
    model.seen = 0
    a3 = accuracy(model, x, y, attack=thrice, eps=0.1)
    assert a3 <= a1
    # clean pass (5) + for each restart: attack steps and a check, on survivors only (2 left)
    assert model.seen < 5 + 3 * 2 * 5


def test_sanity_warnings_flag_impossible_numbers():
    pgd = AttackRun.model_validate("pgd20")
    small = AttackRun.model_validate({"name": "pgd", "steps": 20, "eps": 0.01})
    big = AttackRun.model_validate({"name": "pgd", "steps": 20, "eps": 0.1})
    fine = {
        "test/clean_acc": 0.9,
        "test/robust_acc/pgd20": 0.5,
        "test/robust_acc/pgd20@0.01": 0.8,
        "test/robust_acc/pgd20@0.1": 0.4,
    }
    assert sanity_warnings(fine, [pgd, small, big], eps=0.03) == []
    above = {**fine, "test/robust_acc/pgd20": 0.95}
    assert any("above clean" in w for w in sanity_warnings(above, [pgd], eps=0.03))
    rising = {**fine, "test/robust_acc/pgd20@0.1": 0.85}
    (w,) = sanity_warnings(rising, [small, big], eps=0.03)
    assert "pgd20@0.1" in w and "pgd20@0.01" in w
    unchanged = {**fine, "test/robust_acc/pgd20": 0.9}
    assert any("changed no prediction" in w for w in sanity_warnings(unchanged, [pgd], eps=0.03))


def test_autoattack_in_the_suite_runs_on_its_examples_and_keeps_resumable_state(tmp_path):
    from conftest import make_context, runs_of, tiny_spec_dict, trial_config

    from sweep.spec import parse_spec
    from sweep.trial import run_trial

    evaluation = {
        "attacks": ["pgd20", {"name": "autoattack", "version": "apgd", "examples": 24}],
        "val_attack": "pgd5",
        "val_examples": 100,
        "test_examples": 100,
    }
    spec = parse_spec(tiny_spec_dict(tmp_path, evaluation=evaluation))
    ctx = make_context(tmp_path, spec, experiment="aa")
    run_trial(ctx, trial_config(), lambda m, s: None)
    (run,) = runs_of(ctx)
    m = run.data.metrics
    assert m["test/examples/autoattack_apgd"] == 24
    assert 0 <= m["test/robust_acc/autoattack_apgd"] <= m["test/clean_acc"]
    assert run.data.tags["sanity_warnings"] == "none"  # AA not weaker than PGD-20, no checks hit
    state = tmp_path / "sweep" / "autoattack" / run.info.run_id / "autoattack_apgd.pt"
    assert state.exists()


def test_autoattack_is_refused_as_the_per_epoch_validation_attack():
    import pytest

    from sweep.spec import SpecError, parse_spec

    grid = {"teacher_loss": ["ce"], "method": ["kd"], "train_attack": ["pgd"]}
    with pytest.raises(SpecError, match="evaluation.val_attack: autoattack is far too slow"):
        parse_spec({"name": "x", "grid": grid, "evaluation": {"val_attack": "autoattack"}})
