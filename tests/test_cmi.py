"""CMI, separation and NCMI against hand computations (sweep/cmi.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import py_kl
from torch import nn

from sweep.cmi import (
    class_centroids,
    cmi,
    full_pass_centroids,
    ncmi,
    output_metrics,
    separation,
)


def _h(p, q):
    return -sum(pk * math.log(qk) for pk, qk in zip(p, q, strict=True))


# two classes of three outputs each, class 2 absent; values exact in binary where it matters
PROBS = torch.tensor(
    [
        [0.5, 0.25, 0.25],
        [0.7, 0.2, 0.1],
        [0.6, 0.3, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.6, 0.2],
    ],
    dtype=torch.float64,
)
Y = torch.tensor([0, 0, 0, 1, 1])


def _random_probs(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    return F.softmax(2 * torch.randn(n, c, generator=g, dtype=torch.float64), dim=1)


def test_centroids_are_class_means_and_absent_classes_uniform():
    q = class_centroids(PROBS, Y, 3)
    assert q[0].tolist() == pytest.approx([0.6, 0.25, 0.15])
    assert q[1].tolist() == pytest.approx([0.15, 0.7, 0.15])
    assert q[2].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3])


def test_cmi_is_the_mean_kl_to_the_own_class_centroid():
    rows, labels = PROBS.tolist(), Y.tolist()
    means = {0: [0.6, 0.25, 0.15], 1: [0.15, 0.7, 0.15]}
    expected = sum(py_kl(p, means[c]) for p, c in zip(rows, labels, strict=True)) / len(rows)
    assert cmi(PROBS, Y).item() == pytest.approx(expected, rel=1e-12)
    assert expected > 0.01  # the example is not degenerate


def test_cmi_with_given_centroids_uses_them():
    q = torch.tensor([[0.2, 0.3, 0.5], [0.4, 0.4, 0.2], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    expected = sum(
        py_kl(p, q.tolist()[c]) for p, c in zip(PROBS.tolist(), Y.tolist(), strict=True)
    ) / len(Y)
    assert cmi(PROBS, Y, q).item() == pytest.approx(expected, rel=1e-12)


def test_cmi_is_exactly_zero_when_each_class_has_one_output_and_positive_otherwise():
    same = torch.tensor([[0.5, 0.25, 0.25]] * 3 + [[0.125, 0.75, 0.125]] * 2)
    assert cmi(same, Y).item() == 0.0
    moved = same.clone()
    moved[1] = torch.tensor([0.25, 0.5, 0.25])
    assert cmi(moved, Y).item() > 0


def test_cmi_with_zero_probabilities_is_finite():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    y = torch.tensor([0, 0, 1])
    value = cmi(probs, y).item()
    # class 0: centroid (0.5, 0.5), each one-hot row is log 2 away; class 1: 0
    assert value == pytest.approx(2 * math.log(2) / 3, rel=1e-6)


def test_separation_matches_a_double_loop_over_pairs():
    probs, y = _random_probs(7, 4, seed=0), torch.tensor([0, 1, 1, 2, 0, 3, 1])
    rows, labels = probs.tolist(), y.tolist()
    n = len(rows)
    brute = sum(
        _h(rows[i], rows[j]) for i in range(n) for j in range(n) if labels[i] != labels[j]
    ) / (n * n)
    for chunk in (1, 3, 1024):  # 3 does not divide 7: the last chunk is short
        assert separation(probs, y, chunk=chunk).item() == pytest.approx(brute, rel=1e-12)


def test_separation_ignores_same_class_pairs():
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=torch.float64)
    assert separation(probs, torch.tensor([0, 0])).item() == 0.0
    # different labels: both ordered pairs count, over n^2 = 4
    expected = (_h([0.9, 0.1], [0.1, 0.9]) + _h([0.1, 0.9], [0.9, 0.1])) / 4
    assert separation(probs, torch.tensor([0, 1])).item() == pytest.approx(expected, rel=1e-12)


def test_ncmi_is_cmi_over_separation():
    probs, y = _random_probs(9, 3, seed=1), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    expected = cmi(probs, y).item() / separation(probs, y).item()
    assert ncmi(probs, y).item() == pytest.approx(expected, rel=1e-12)


def test_output_metrics_are_those_of_the_eval_mode_softmax_and_modes_are_restored():
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    model = nn.Sequential(linear, nn.Dropout(0.5))  # dropout would change train-mode outputs
    model.train()
    x, y = torch.rand(10, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    got = output_metrics(model, x, y, batch_size=3)
    with torch.no_grad():
        probs = F.softmax(linear(x), dim=1)
    assert got["cmi"] == pytest.approx(cmi(probs, y).item(), rel=1e-5)
    assert got["separation"] == pytest.approx(separation(probs, y).item(), rel=1e-5)
    assert got["ncmi"] == pytest.approx(ncmi(probs, y).item(), rel=1e-5)
    assert all(m.training for m in model.modules())


def test_full_pass_centroids_are_class_means_in_train_mode_and_modes_are_restored():
    torch.manual_seed(0)
    x, y = torch.randn(30, 3), torch.arange(30) % 3
    seen_modes = []
    net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.0))
    net.register_forward_hook(lambda m, i, o: seen_modes.append(m.training))
    net.eval()
    q = full_pass_centroids(net, x, y, 3, batch_size=7)  # 5 shuffled batches, the last short
    assert seen_modes == [True] * 5 and not net.training and not net[1].training
    with torch.no_grad():
        expected = class_centroids(F.softmax(net(x), 1), y, 3)
    assert torch.allclose(q, expected, atol=1e-6)
