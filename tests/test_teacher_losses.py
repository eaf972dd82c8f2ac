"""Teacher losses against hand computations (DESIGN §4, sweep/teacher_losses.py).

Most tests feed logits straight in through an identity "model", so the loss of a batch is a
function of hand-written numbers; the adversarial ones use a small linear model on [0, 1] inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import py_kl, py_softmax
from torch import nn

from sweep.attacks import ce_objective, pgd
from sweep.teacher_losses import TEACHER_LOSSES, LossParam, TeacherLoss

LOGITS = [[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]]
LABELS = [1, 0]
IDENTITY = nn.Identity()


def _ce(rows, labels):
    return -sum(math.log(py_softmax(r)[c]) for r, c in zip(rows, labels, strict=True)) / len(rows)


def _make(name, num_classes=3, **params):
    cls = TEACHER_LOSSES.get(name)
    full = {k: p.default for k, p in cls.params.items()}
    full.update(params)
    return cls(full, num_classes)


def _value(loss: TeacherLoss, rows, labels) -> float:
    return loss.loss(IDENTITY, torch.tensor(rows), torch.tensor(labels)).item()


def test_registry_holds_the_teacher_losses_of_design_section_4():
    assert TEACHER_LOSSES.names() == sorted(
        ["ce", "mse", "label_smoothing", "mcmi", "cmic", "pgd_at", "trades"]
    )
    adversarial = {n for n, cls in TEACHER_LOSSES.items() if cls.adversarial}
    assert adversarial == {"pgd_at", "trades"}


def test_ce_is_the_negative_log_likelihood():
    assert _value(_make("ce"), LOGITS, LABELS) == pytest.approx(_ce(LOGITS, LABELS), rel=1e-6)


def test_mse_is_the_squared_error_of_probabilities_against_one_hot():
    total = 0.0
    for row, label in zip(LOGITS, LABELS, strict=True):
        p = py_softmax(row)
        total += sum((pk - (1.0 if k == label else 0.0)) ** 2 for k, pk in enumerate(p))
    assert _value(_make("mse"), LOGITS, LABELS) == pytest.approx(total / 2, rel=1e-6)


def test_mse_differs_from_ce_in_value_and_gradient():
    """The seed paper's public code trains with CE when MSE is asked for; ours must not."""
    torch.manual_seed(0)
    logits = torch.randn(8, 5, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    values, grads = {}, {}
    for name in ("ce", "mse"):
        loss = _make(name, num_classes=5).loss(IDENTITY, logits, y)
        (grads[name],) = torch.autograd.grad(loss, logits)
        values[name] = loss.item()
    assert values["ce"] != pytest.approx(values["mse"], rel=1e-3)
    assert not torch.allclose(grads["ce"], grads["mse"], rtol=1e-2, atol=1e-4)


def test_label_smoothing_mixes_ce_with_the_mean_negative_log_probability():
    s = 0.2
    expected = 0.0
    for row, label in zip(LOGITS, LABELS, strict=True):
        logp = [math.log(p) for p in py_softmax(row)]
        expected += (1 - s) * -logp[label] + s * sum(-v for v in logp) / 3
    expected /= 2
    got = _value(_make("label_smoothing", smoothing=s), LOGITS, LABELS)
    assert got == pytest.approx(expected, rel=1e-6)
    assert got != pytest.approx(_ce(LOGITS, LABELS), rel=1e-3)


def test_mcmi_is_ce_minus_lambda_kl_to_the_centroids_which_follow_the_ema_rule():
    lam, m = 0.5, 0.75
    loss = _make("mcmi", **{"lambda": lam, "momentum": m, "centroids": "ema"})
    uniform = [1 / 3] * 3

    # batch 1: centroids still uniform; classes 0 and 1 seen for the first time, 2 absent
    b1, y1 = [[1.0, 2.0, 0.0], [0.5, -1.0, 3.0], [0.0, 1.5, -0.5]], [0, 0, 1]
    p1 = [py_softmax(r) for r in b1]
    kl1 = sum(py_kl(p, uniform) for p in p1) / 3
    assert _value(loss, b1, y1) == pytest.approx(_ce(b1, y1) - lam * kl1, rel=1e-5)
    q1 = {
        0: [(a + b) / 2 for a, b in zip(p1[0], p1[1], strict=True)],  # first update: batch mean
        1: p1[2],
        2: uniform,
    }
    for c in range(3):
        assert loss.centroids[c].tolist() == pytest.approx(q1[c], rel=1e-5)

    # batch 2 uses the centroids as they were after batch 1 (before its own update)
    b2, y2 = [[2.0, 0.0, 1.0], [0.0, 0.0, 2.0], [-1.0, 1.0, 1.0]], [0, 2, 2]
    p2 = [py_softmax(r) for r in b2]
    kl2 = sum(py_kl(p, q1[c]) for p, c in zip(p2, y2, strict=True)) / 3
    assert _value(loss, b2, y2) == pytest.approx(_ce(b2, y2) - lam * kl2, rel=1e-5)
    q2 = {
        0: [m * a + (1 - m) * b for a, b in zip(q1[0], p2[0], strict=True)],  # EMA
        1: q1[1],  # absent from batch 2: unchanged
        2: [(a + b) / 2 for a, b in zip(p2[1], p2[2], strict=True)],  # first seen: batch mean
    }
    for c in range(3):
        assert loss.centroids[c].tolist() == pytest.approx(q2[c], rel=1e-5)


def test_mcmi_gradient_does_not_flow_through_the_centroids():
    """With Q constant, d/dz of KL(softmax(z) || Q) is what autograd must give."""
    lam = 1.0
    loss = _make("mcmi", **{"lambda": lam, "centroids": "ema"})
    _value(loss, [[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]], [0, 1])  # give Q non-uniform rows
    q = loss.centroids.clone()
    z = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]], requires_grad=True)
    y = torch.tensor(LABELS)
    (g,) = torch.autograd.grad(loss.loss(IDENTITY, z, y), z)
    z2 = z.detach().clone().requires_grad_(True)
    logp = F.log_softmax(z2, dim=1)
    ref = F.nll_loss(logp, y) - lam * (logp.exp() * (logp - q[y].log())).sum(1).mean()
    (g_ref,) = torch.autograd.grad(ref, z2)
    assert torch.allclose(g, g_ref, atol=1e-6)


def test_cmic_begin_sets_class_means_and_priors_in_eval_mode():
    train_x = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0], [0.0, 1.5, -0.5], [2.0, 0.0, 1.0]])
    train_y = torch.tensor([0, 0, 1, 0])
    model = nn.Sequential(nn.Dropout(0.9))  # in train mode it would scramble the outputs
    model.train()
    loss = _make("cmic")
    loss.begin(model, train_x, train_y, batch_size=3)
    assert model[0].training
    p = [py_softmax(r) for r in train_x.tolist()]
    q0 = [sum(col) / 3 for col in zip(p[0], p[1], p[3], strict=True)]
    assert loss.centroids[0].tolist() == pytest.approx(q0, rel=1e-5)
    assert loss.centroids[1].tolist() == pytest.approx(p[2], rel=1e-5)
    assert loss.centroids[2].tolist() == pytest.approx([1 / 3] * 3, rel=1e-6)
    assert loss.priors.tolist() == pytest.approx([0.75, 0.25, 0.0])


def test_cmic_loss_is_ce_plus_lambda_cmi_minus_beta_separation_and_q_step_sets_epoch_means():
    lam, beta = 0.3, 0.2
    loss = _make("cmic", **{"lambda": lam, "beta": beta})
    train = [[1.0, 2.0, 0.0], [0.5, -1.0, 3.0], [0.0, 1.5, -0.5], [2.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    train_y = [0, 1, 2, 0, 2]
    loss.begin(IDENTITY, torch.tensor(train), torch.tensor(train_y), batch_size=2)
    pi = [0.4, 0.2, 0.4]
    q = loss.centroids.tolist()

    batch, y = [[2.0, -1.0, 0.5], [0.0, 3.0, 1.0], [1.0, 1.0, -2.0]], [0, 1, 0]
    expected = _ce(batch, y)
    for row, c in zip(batch, y, strict=True):
        p = py_softmax(row)
        cross = {
            v: -sum(pk * math.log(qk) for pk, qk in zip(p, q[v], strict=True)) for v in range(3)
        }
        expected += lam * py_kl(p, q[c]) / 3
        expected -= beta * sum(pi[v] * cross[v] for v in range(3) if v != c) / 3
    assert _value(loss, batch, y) == pytest.approx(expected, rel=1e-5)
    # the theta-step keeps Q fixed for the whole epoch
    assert loss.centroids.tolist() == q

    batch2, y2 = [[0.0, 1.0, 0.0]], [0]
    loss.loss(IDENTITY, torch.tensor(batch2), torch.tensor(y2))
    loss.end_epoch()
    p = [py_softmax(r) for r in batch + batch2]
    epoch_q0 = [sum(col) / 3 for col in zip(p[0], p[2], p[3], strict=True)]
    assert loss.centroids[0].tolist() == pytest.approx(epoch_q0, rel=1e-5)
    assert loss.centroids[1].tolist() == pytest.approx(p[1], rel=1e-5)
    assert loss.centroids[2].tolist() == pytest.approx(q[2], rel=1e-6)  # unseen: kept

    # the next epoch accumulates afresh
    loss.loss(IDENTITY, torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([1]))
    loss.end_epoch()
    assert loss.centroids[1].tolist() == pytest.approx(py_softmax([3.0, 0.0, 0.0]), rel=1e-5)
    assert loss.centroids[0].tolist() == pytest.approx(epoch_q0, rel=1e-5)


def _linear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    model.train()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 4, generator=g)
    x[0, :2] = torch.tensor([0.0, 1.0])  # at the data range's edges
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return model, x, y


def _eval_logits(model, x):
    model.eval()
    try:
        return model(x)
    finally:
        model.train()


def test_pgd_at_perturbs_within_the_ball_and_is_ce_at_x_adv():
    model, x, y = _linear_model()
    eps, steps = 0.1, 3
    loss = _make("pgd_at", eps=eps, steps=steps)
    assert loss.step_size == pytest.approx(2.5 * eps / steps)

    torch.manual_seed(5)
    x_adv = loss.perturb(model, x, y)
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert all(m.training for m in model.modules())
    with torch.no_grad():
        assert F.cross_entropy(_eval_logits(model, x_adv), y) > F.cross_entropy(
            _eval_logits(model, x), y
        )

    model.eval()  # no dropout, so the loss is a deterministic function of x'
    torch.manual_seed(5)
    got = loss.loss(model, x, y)
    torch.manual_seed(5)
    ref_adv = pgd(model, x, ce_objective(y), eps=eps, steps=steps, step_size=2.5 * eps / steps)
    assert torch.equal(ref_adv, x_adv)
    assert got.item() == pytest.approx(F.cross_entropy(model(ref_adv), y).item(), rel=1e-6)


def test_trades_with_beta_zero_is_ce_on_clean_inputs():
    model, x, y = _linear_model()
    model.eval()
    loss = _make("trades", beta=0.0, eps=0.1)
    assert loss.loss(model, x, y).item() == pytest.approx(
        F.cross_entropy(model(x), y).item(), rel=1e-6
    )


def test_trades_kl_term_equals_a_hand_computation_for_a_given_x_adv():
    model, x, y = _linear_model()
    model.eval()
    with torch.no_grad():
        model[0].weight.mul_(4)  # outputs far apart, so KL(p||p') and KL(p'||p) differ clearly
    beta = 2.0
    loss = _make("trades", beta=beta, eps=0.1)
    x_adv = 1 - x  # any given point: the loss does not care how x' was found
    with torch.no_grad():
        nat, adv = model(x).tolist(), model(x_adv).tolist()
    kl = sum(py_kl(py_softmax(a), py_softmax(b)) for a, b in zip(nat, adv, strict=True)) / len(nat)
    reverse = sum(py_kl(py_softmax(b), py_softmax(a)) for a, b in zip(nat, adv, strict=True)) / len(
        nat
    )
    assert kl > 0 and abs(kl - reverse) > 1e-2 * kl
    term = loss.robust_loss(model, x, x_adv, y).item() - _ce(nat, y.tolist())
    assert term == pytest.approx(beta * kl, rel=1e-4)


def test_trades_attack_stays_in_the_ball_and_raises_the_kl():
    model, x, y = _linear_model()
    eps = 0.1
    loss = _make("trades", eps=eps, steps=5)
    torch.manual_seed(0)
    x_adv = loss.perturb(model, x, y)
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert all(m.training for m in model.modules())  # attacked in eval mode, then restored

    def kl(xa):
        with torch.no_grad():
            p, pa = F.softmax(_eval_logits(model, x), 1), F.softmax(_eval_logits(model, xa), 1)
        return (p * (p.log() - pa.log())).sum(1).mean().item()

    assert kl(x_adv) > 10 * kl((x + 0.001 * torch.randn_like(x)).clamp(0, 1))


def test_trades_attack_is_the_authors_loop():
    """Zhang et al.'s code: eval mode, start at x + 0.001 N(0, 1), ascend the summed
    KL(p(x) || p(x')) by signed steps, project onto the eps-ball and [0, 1] after each."""
    model, x, y = _linear_model()
    eps, steps = 0.1, 4
    loss = _make("trades", eps=eps, steps=steps, step_size=0.03)
    torch.manual_seed(3)
    got = loss.perturb(model, x, y)

    model.eval()
    torch.manual_seed(3)
    p_nat = F.softmax(model(x), dim=1).detach()
    ref = x + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        ref = ref.detach().requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(ref), dim=1), p_nat, reduction="sum")
        (g,) = torch.autograd.grad(kl, ref)
        ref = torch.min(torch.max(ref.detach() + 0.03 * g.sign(), x - eps), x + eps).clamp(0, 1)
    model.train()
    assert torch.allclose(got, ref, atol=1e-6)


def test_adversarial_losses_need_a_resolved_eps():
    for name in ("pgd_at", "trades"):
        with pytest.raises(ValueError, match="eps must be resolved"):
            _make(name)


@pytest.mark.parametrize(
    "name,params",
    [
        ("ce", {"smoothing": 0.1}),  # unknown
        ("label_smoothing", {}),  # missing
        ("mcmi", {"lambda": 0.1, "centroids": "ema"}),  # missing momentum
        ("mcmi", {"lambda": 0.1, "momentum": 0.9, "centroids": "ema", "extra": 1}),  # unknown
    ],
)
def test_missing_or_unknown_params_raise(name, params):
    with pytest.raises(ValueError):
        TEACHER_LOSSES.get(name)(params, 3)


@pytest.mark.parametrize(
    "name,params",
    [
        ("label_smoothing", {"smoothing": 1.0}),
        ("label_smoothing", {"smoothing": -0.1}),
        ("mcmi", {"lambda": -1.0}),
        ("mcmi", {"momentum": 1.0}),
        ("mcmi", {"centroids": "running"}),
        ("mcmi", {"centroids": 1}),
        ("cmic", {"beta": -0.5}),
        ("pgd_at", {"eps": 0.1, "steps": 0}),
        ("pgd_at", {"eps": 0.1, "steps": 2.5}),
        ("trades", {"eps": 1.5}),
    ],
)
def test_out_of_range_params_raise_at_construction(name, params):
    with pytest.raises(ValueError):
        _make(name, **params)


def test_loss_param_check():
    p = LossParam(0.1, low=0.0, high=1.0)
    assert p.check(0.0) is None and p.check(1.0) is None and p.check(1) is None  # inclusive
    assert p.check(-1) == "must be >= 0.0 (got -1)"
    assert p.check(1.5) == "must be <= 1.0 (got 1.5)"
    assert p.check(None) is not None  # only a None default admits None
    assert p.check("0.5") is not None and p.check(True) is not None
    assert p.check(float("nan")) is not None
    n = LossParam(10, low=1, integer=True)
    assert n.check(3) is None
    assert n.check(2.0) == "must be an integer"
    assert n.check(0) == "must be >= 1 (got 0)"
    assert LossParam(None, low=0.0).check(None) is None
    smoothing = TEACHER_LOSSES.get("label_smoothing").params["smoothing"]
    assert smoothing.check(0.999) is None and smoothing.check(1.0) == "must be < 1.0 (got 1.0)"


def test_describe_lists_summary_flag_and_params():
    d = TEACHER_LOSSES.get("trades").describe()
    assert d["adversarial"] is True
    assert set(d["params"]) == {"beta", "eps", "steps", "step_size"}
    assert d["params"]["beta"] == {
        "default": 6.0,
        "low": 0.0,
        "high": None,
        "high_open": False,
        "integer": False,
        "doc": d["params"]["beta"]["doc"],
    }
    smoothing = TEACHER_LOSSES.get("label_smoothing").describe()["params"]["smoothing"]
    assert smoothing["high"] == 1.0 and smoothing["high_open"] is True
    assert d["params"]["eps"]["default"] is None
    assert TEACHER_LOSSES.get("ce").describe()["params"] == {}
    assert d["fidelity"]["checked"] == "authors-code" and "TRADES" in d["fidelity"]["source"]
    assert d["default_start"] is None


def test_choice_parameters_take_only_their_names():
    p = LossParam("full_pass", choices=("full_pass", "ema"))
    assert p.check("ema") is None and p.check("full_pass") is None
    assert p.check("EMA") == "must be one of full_pass, ema (got 'EMA')"
    assert p.check(None) is not None and p.check(0.5) is not None


@pytest.mark.parametrize("name", sorted(TEACHER_LOSSES.names()))
def test_every_teacher_loss_declares_its_fidelity(name):
    f = TEACHER_LOSSES.get(name).fidelity
    assert f.source != "not declared"
    expected = "paper-text" if name == "cmic" else "authors-code"
    assert f.checked == expected
    assert TEACHER_LOSSES.get(name).describe()["fidelity"]["checked"] == expected


def test_cmic_lists_the_penalty_form_as_a_departure_and_mse_the_authors_bug():
    cmic = TEACHER_LOSSES.get("cmic").fidelity.departures
    assert any("penalty form" in d and "our derivation" in d for d in cmic)
    assert any("always trains CE" in d for d in TEACHER_LOSSES.get("mse").fidelity.departures)


def test_mcmi_defaults_are_the_authors_and_its_default_start_fine_tunes_ce():
    cls = TEACHER_LOSSES.get("mcmi")
    assert cls.params["lambda"].default == 0.25
    assert cls.params["centroids"].default == "full_pass"
    r = cls.default_start
    assert (r.start_from, r.epochs) == ("ce", 20)
    assert r.optim_for("resnet18") == {
        "optimizer": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "batch_size": 64,
        "schedule": "cosine",
    }
    assert r.optim_for("mobilenetv2")["lr"] == 0.005
    assert cls.describe()["default_start"]["epochs"] == 20
    assert all(
        TEACHER_LOSSES.get(n).default_start is None for n in TEACHER_LOSSES.names() if n != "mcmi"
    )


class _BNNet(nn.Module):
    """Linear logits behind a batch-norm: train and eval mode give different outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.bn(x))


def test_mcmi_full_pass_centroids_are_class_means_of_one_train_mode_pass_and_stay_frozen():
    torch.manual_seed(0)
    x, y = torch.randn(40, 4), torch.arange(40) % 3
    net = _BNNet()
    loss = _make("mcmi", **{"lambda": 0.25})
    with pytest.raises(RuntimeError, match="begin"):
        loss.loss(net, x[:4], y[:4])  # no Q yet
    net.eval()  # begin must run the pass in train mode (as the authors) and restore eval
    flipped = []

    def augment(xb):
        flipped.append(len(xb))
        return -xb

    torch.manual_seed(1)
    loss.begin(net, x, y, 40, augment)  # one batch: train-mode BN over the whole (augmented) set
    assert flipped == [40] and not net.training
    with torch.no_grad():
        probs = F.softmax(
            net.fc((-x - (-x).mean(0)) / ((-x).var(0, unbiased=False) + 1e-5).sqrt()), 1
        )
    expected = torch.stack([probs[y == c].mean(0) for c in range(3)])
    assert torch.allclose(loss.centroids, expected, atol=1e-5)
    q = loss.centroids.clone()
    # an epoch of fine-tuning moves the network, not Q
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for i in range(0, 40, 8):
        opt.zero_grad()
        loss.loss(net, x[i : i + 8], y[i : i + 8]).backward()
        opt.step()
    loss.end_epoch()
    assert torch.equal(loss.centroids, q)
    # and the loss is CE - lambda * mean KL to those frozen centroids
    with torch.no_grad():
        logp = F.log_softmax(net(x[:8]), 1)
        ref = F.nll_loss(logp, y[:8]) - 0.25 * (logp.exp() * (logp - q[y[:8]].log())).sum(1).mean()
        assert loss.loss(net, x[:8], y[:8]).item() == pytest.approx(ref.item(), rel=1e-5)
