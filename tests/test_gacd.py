"""GACD's CRD-style objective (sweep/methods/gacd.py): the critic and the weighted NCE against
hand computations, the per-class memory (negatives from other classes only, ring semantics),
who gets gradients (heads, student, not the teacher), the teacher-confidence weighting, and a
checkpoint round trip of the trainable parts."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sweep.methods.gacd import (
    EMBED_DIM,
    GACD,
    ClassMemory,
    GACDParts,
    critic_logit,
    first_log_z,
    weighted_nce,
)

HP = {"tau": 0.2, "distill_weight": 1.5}


class FeatNet(nn.Module):
    """features = tanh(x.flatten(1) @ W), logits = head(features): the features / head
    convention of models.forward_features, small enough to check by hand."""

    def __init__(self, d_in: int, width: int, classes: int, gen: torch.Generator, scale=1.0):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d_in, width, generator=gen))
        self.head = nn.Linear(width, classes, bias=False)
        self.head.weight.data = scale * torch.randn(classes, width, generator=gen)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.flatten(1) @ self.w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _problem(seed=0, n=8, classes=3, ds=4, dt=6, teacher_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    student = FeatNet(4, ds, classes, g)
    teacher = FeatNet(4, dt, classes, g, scale=teacher_scale).requires_grad_(False).eval()
    x = torch.rand(n, 1, 2, 2, generator=g)
    x_adv = (x + 0.1 * (2 * torch.rand(x.shape, generator=g) - 1)).clamp(0, 1)
    y = torch.arange(n) % classes  # every class present
    return student, teacher, x, x_adv, y


def _built(student, teacher, x, n_train=40, k=5, seed=0) -> GACD:
    torch.manual_seed(seed)
    method = GACD(HP)
    method.n_negatives = k  # small k: the hand computation enumerates the negatives
    method.build(student, [teacher], x, n_train)
    return method


# --- the critic and the per-anchor loss, by hand ---------------------------------------------------


def test_critic_is_crd_h_with_k_over_m():
    """h = e/(e + k/M), e = exp(dot/tau)/Z, for a few dots, from plain floats."""
    dots, tau, z, k, m = [-0.9, 0.0, 0.3, 1.0], 0.1, 250.0, 4, 1000
    got = torch.sigmoid(
        critic_logit(torch.tensor(dots, dtype=torch.float64), tau, math.log(z), k, m)
    )
    for h, d in zip(got.tolist(), dots, strict=True):
        e = math.exp(d / tau) / z
        assert h == pytest.approx(e / (e + k / m), rel=1e-12)
    # without Z (log Z = 0) it is the papers' formula as printed
    h0 = torch.sigmoid(critic_logit(torch.tensor([0.5], dtype=torch.float64), 0.5, 0.0, 2, 10))
    assert h0.item() == pytest.approx(math.e / (math.e + 0.2), rel=1e-12)


def test_weighted_nce_by_hand():
    pos = torch.tensor([0.8, -0.2], dtype=torch.float64)
    neg = torch.tensor([[0.1, -0.5, 0.9], [0.0, 0.3, -0.1]], dtype=torch.float64)
    w = torch.tensor([0.25, 0.9], dtype=torch.float64)
    tau, log_z, m = 0.3, 2.0, 50
    got = weighted_nce(pos, neg, torch.tensor([True, True]), w, tau, log_z, m).tolist()
    k = 3

    def h(d):
        e = math.exp(d / tau) / math.exp(log_z)
        return e / (e + k / m)

    for i in range(2):
        expected = -math.log(h(pos[i].item())) - sum(math.log(1 - h(d)) for d in neg[i].tolist())
        assert got[i] == pytest.approx(w[i].item() * expected, rel=1e-10)
    # an anchor with no negatives keeps its positive term only
    alone = weighted_nce(pos, neg, torch.tensor([False, True]), w, tau, log_z, m)
    assert alone[0].item() == pytest.approx(-0.25 * math.log(h(0.8)), rel=1e-10)
    assert alone[1].item() == pytest.approx(got[1], rel=1e-12)


def test_first_log_z_is_crd_normaliser():
    """Z = M * mean of exp(dot/tau) over positive and available negative pairs."""
    pos = torch.tensor([0.5, 0.1])
    neg = torch.tensor([[0.2, -0.3], [0.9, 0.7]])
    tau, m = 0.5, 100
    got = first_log_z(pos, neg, torch.tensor([True, False]), tau, m).item()
    vals = [0.5, 0.2, -0.3, 0.1]  # anchor 1's negatives are not available
    assert got == pytest.approx(math.log(m * sum(math.exp(v / tau) for v in vals) / 4), rel=1e-6)


# --- the memory ------------------------------------------------------------------------------------


def _filled_memory(classes=4, q=5, seed=0) -> tuple[ClassMemory, list[int]]:
    """A memory whose slots hold, as embedding, a one-hot of their class (checkable)."""
    mem = ClassMemory(classes, q, classes)
    counts = [5, 2, 0, 3]  # class 2 has no entry yet; class 0 is full
    y = torch.tensor([c for c, n in enumerate(counts) for _ in range(n)])
    mem.push(F.one_hot(y, classes).float(), y)
    return mem, counts


def test_negatives_come_from_filled_slots_of_other_classes_only():
    mem, counts = _filled_memory()
    q = mem.per_class
    y = torch.tensor([0, 1, 2, 3] * 50)
    torch.manual_seed(0)
    slots, available = mem.sample(y, 200)
    assert available.all()
    cls, pos = slots // q, slots % q
    assert (cls != y[:, None]).all()
    assert (pos < torch.tensor(counts)[cls]).all()  # only filled slots
    assert (mem.bank[slots].argmax(-1) == cls).all()  # and what the slot holds is that class
    # every candidate slot is drawn (uniform over them): anchor class 1 -> 5 + 3 candidates
    got = set(slots[y == 1].flatten().tolist())
    assert got == {*range(0, 5), *range(3 * q, 3 * q + 3)}
    # roughly uniform: each of the 8 candidates gets about 1/8 of the draws
    freq = torch.bincount(slots[y == 1].flatten(), minlength=len(mem.bank)).float()
    share = freq[freq > 0] / freq.sum()
    assert share.min() > 0.09 and share.max() < 0.16


def test_an_anchor_without_other_class_entries_has_no_negatives():
    mem = ClassMemory(3, 4, 2)
    y = torch.tensor([1, 1])
    mem.push(torch.ones(2, 2), y)
    slots, available = mem.sample(torch.tensor([1, 0]), 7)
    assert available.tolist() == [False, True]
    assert (slots[1] // 4 == 1).all()  # class 0's negatives: the class-1 entries
    assert slots.min() >= 0 and slots.max() < len(mem.bank)


def test_memory_rings_keep_the_latest_entries_of_each_class():
    mem = ClassMemory(2, 3, 1)
    # class 0 gets 5 entries (values 1..5) in one batch: only the last 3 are kept
    y = torch.tensor([0, 1, 0, 0, 0, 0])
    vals = torch.tensor([1.0, 10.0, 2.0, 3.0, 4.0, 5.0])[:, None]
    mem.push(vals, y)
    assert mem.filled.tolist() == [3, 1] and mem.ptr.tolist() == [5 % 3, 1]
    assert sorted(mem.bank[0:3, 0].tolist()) == [3.0, 4.0, 5.0]
    assert mem.bank[3, 0].item() == 10.0
    # the next class-0 entry overwrites the oldest (3.0)
    mem.push(torch.tensor([[6.0]]), torch.tensor([0]))
    assert sorted(mem.bank[0:3, 0].tolist()) == [4.0, 5.0, 6.0]
    assert mem.filled.tolist() == [3, 1]


# --- the loss, end to end --------------------------------------------------------------------------


def _hand_loss(method: GACD, before: GACDParts, student, teacher, x, x_adv, y, seed: int):
    """The module docstring's loss from the parts as they were before the call: push the
    teacher embeddings, draw the same negatives (same seed), then plain Python arithmetic."""
    parts = copy.deepcopy(before)
    with torch.no_grad():
        s = parts.embed_s(student.features(x_adv)).double().tolist()
        t = parts.embed_t(teacher.features(x))
        parts.memory.push(t, y)
        torch.manual_seed(seed)
        slots, available = parts.memory.sample(y, method.n_negatives)
        bank = parts.memory.bank.double().tolist()
        t = t.double().tolist()
        logits_s = student(x_adv).double().tolist()
        p_t = F.softmax(teacher(x).double(), 1).tolist()
    tau, lam, m, k = HP["tau"], HP["distill_weight"], parts.n_train, method.n_negatives
    dot = lambda a, b: sum(u * v for u, v in zip(a, b, strict=True))  # noqa: E731
    pos = [dot(s[i], t[i]) for i in range(len(s))]
    neg = [[dot(s[i], bank[j]) for j in slots[i].tolist()] for i in range(len(s))]
    pairs = [p / tau for p in pos] + [d / tau for row in neg for d in row]
    z = m * sum(math.exp(v) for v in pairs) / len(pairs)  # first call: Z from this batch
    assert available.all()

    def h(d):
        e = math.exp(d / tau) / z
        return e / (e + k / m)

    total = 0.0
    for i, c in enumerate(y.tolist()):
        ce = -logits_s[i][c] + math.log(sum(math.exp(v) for v in logits_s[i]))
        nce = -math.log(h(pos[i])) - sum(math.log(1 - h(d)) for d in neg[i])
        total += ce + lam * p_t[i][c] * nce
    return total / len(s), slots


def test_loss_matches_hand_computation():
    student, teacher, x, x_adv, y = _problem()
    method = _built(student, teacher, x)
    # a memory that already holds entries of every class (an earlier batch); Z left unset, so
    # the call below sets it from its own batch, as the hand version does
    method.loss(student, [teacher], x_adv, x, y.roll(1))
    method.trainable.log_z.fill_(float("nan"))
    before = copy.deepcopy(method.trainable)
    torch.manual_seed(7)
    got = method.loss(student, [teacher], x, x_adv, y).item()
    expected, slots = _hand_loss(method, before, student, teacher, x, x_adv, y, seed=7)
    assert (slots // before.memory.per_class != y[:, None]).all()
    ce_only = F.cross_entropy(student(x_adv), y).item()
    assert abs(expected - ce_only) > 0.5  # the contrastive term is not vacuous here
    assert got == pytest.approx(expected, rel=1e-5)


def test_z_is_set_once_and_then_kept():
    student, teacher, x, x_adv, y = _problem(seed=1)
    method = _built(student, teacher, x)
    assert torch.isnan(method.trainable.log_z)
    method.loss(student, [teacher], x, x_adv, y)
    z1 = method.trainable.log_z.item()
    assert math.isfinite(z1)
    method.loss(student, [teacher], x_adv, x, y.flip(0))  # another batch
    assert method.trainable.log_z.item() == z1


def test_heads_and_student_get_gradients_teacher_none():
    student, teacher, x, x_adv, y = _problem(seed=2)
    method = _built(student, teacher, x)
    method.loss(student, [teacher], x, x_adv, y).backward()
    for name, p in method.trainable.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert student.w.grad.abs().sum() > 0 and student.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    # the memory holds detached copies: no buffer carries a graph
    assert not any(b.requires_grad for b in method.trainable.buffers())


def test_student_sees_x_adv_and_teacher_sees_x():
    """Swapping the two inputs (student on x, teacher on x') changes the loss: the method
    feeds them to the networks they belong to."""
    student, teacher, x, x_adv, y = _problem(seed=3)
    parts = _built(student, teacher, x).trainable
    losses = {}
    for name, (xt, xs) in {"ref": (x, x_adv), "swap": (x_adv, x)}.items():
        method = GACD(HP)
        method.n_negatives = 5
        method.trainable = copy.deepcopy(parts)
        torch.manual_seed(0)
        losses[name] = method.loss(student, [teacher], xt, xs, y).item()
    assert losses["ref"] != pytest.approx(losses["swap"], rel=1e-4)


def test_weighting_by_the_teachers_probability_of_the_label():
    """A near one-hot teacher wrong on every other example: those anchors' NCE terms drop out
    (w ~ 0), the others count fully (w ~ 1); with a uniform teacher every w is 1/C."""
    student, teacher, x, x_adv, _ = _problem(seed=4, teacher_scale=200.0)
    with torch.no_grad():
        pred = teacher(x).argmax(1)
    y = pred.clone()
    y[::2] = (pred[::2] + 1) % 3
    method = _built(student, teacher, x)
    parts = copy.deepcopy(method.trainable)
    torch.manual_seed(3)
    got = method.loss(student, [teacher], x, x_adv, y)
    # per-anchor terms, unweighted, from the same state and draw
    ref = copy.deepcopy(parts)
    with torch.no_grad():
        s = ref.embed_s(student.features(x_adv))
        t = ref.embed_t(teacher.features(x))
        ref.memory.push(t, y)
        torch.manual_seed(3)
        slots, ok = ref.memory.sample(y, method.n_negatives)
        pos, neg = (s * t).sum(1), (s @ ref.memory.bank.T).gather(1, slots)
        log_z = first_log_z(pos, neg, ok, HP["tau"], ref.n_train)
        per = weighted_nce(pos, neg, ok, torch.ones(len(y)), HP["tau"], log_z, ref.n_train)
        p_y = F.softmax(teacher(x), 1).gather(1, y[:, None]).squeeze(1)
    assert (p_y[::2] < 1e-3).all() and (p_y[1::2] > 0.999).all()
    assert per[::2].min() > 0.5  # the dropped anchors' terms are not vacuous
    ce = F.cross_entropy(student(x_adv), y)
    right_only = per[1::2].sum() / len(y)
    assert ((got - ce) / HP["distill_weight"]).item() == pytest.approx(right_only.item(), rel=1e-3)

    # a uniform teacher (zero head): every weight is exactly 1/C
    with torch.no_grad():
        teacher.head.weight.zero_()
    method.trainable = copy.deepcopy(parts)
    torch.manual_seed(3)
    got = method.loss(student, [teacher], x, x_adv, y)
    expected = ce + HP["distill_weight"] * per.mean() / 3
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)


def test_checkpoint_round_trip_gives_the_same_loss():
    """build, a training step (memory filled, Z set, heads moved), state_dict -> a fresh
    method's build -> load_state_dict: the same loss on the same batch with the same draw."""
    student, teacher, x, x_adv, y = _problem(seed=5)
    method = _built(student, teacher, x, seed=0)
    opt = torch.optim.SGD([*student.parameters(), *method.trainable.parameters()], lr=0.5)
    torch.manual_seed(1)
    method.loss(student, [teacher], x, x_adv, y).backward()
    opt.step()
    state = copy.deepcopy(method.trainable.state_dict())
    assert method.trainable.memory.filled.sum() > 0 and math.isfinite(state["log_z"].item())

    fresh = _built(student, teacher, x, seed=123)  # different initial heads
    fresh.trainable.load_state_dict(state)
    assert set(state) >= {"memory.bank", "memory.filled", "memory.ptr", "log_z"}
    torch.manual_seed(2)
    a = method.loss(student, [teacher], x_adv, x, y.roll(1)).item()
    torch.manual_seed(2)
    b = fresh.loss(student, [teacher], x_adv, x, y.roll(1)).item()
    assert a == b
    # and a fresh build without the state gives another loss (the check can fail)
    other = _built(student, teacher, x, seed=123)
    torch.manual_seed(2)
    assert other.loss(student, [teacher], x_adv, x, y.roll(1)).item() != pytest.approx(a)


# --- build ---------------------------------------------------------------------------------------


def test_build_reads_widths_and_classes_and_leaves_the_student_alone():
    from sweep.models import build_model

    torch.manual_seed(0)
    kw = {"in_channels": 1, "num_classes": 10, "mean": (0.5,), "std": (0.25,)}
    student = build_model("small_cnn", **kw).train()  # 64 features
    teacher = build_model("resnet18", **kw).eval()  # 512 features
    bn_before = copy.deepcopy(student.state_dict())
    x = torch.rand(8, 1, 8, 8)
    method = GACD(HP)
    method.build(student, [teacher], x, n_train=95)
    parts = method.trainable
    assert parts.embed_s.linear.in_features == 64 and parts.embed_t.linear.in_features == 512
    assert parts.embed_s.linear.out_features == EMBED_DIM
    assert parts.memory.num_classes == 10 and parts.memory.per_class == 10  # ceil(95 / 10)
    assert parts.n_train == 95
    assert student.training  # mode restored
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in bn_before.items())


def test_loss_without_build_says_so():
    student, teacher, x, x_adv, y = _problem()
    with pytest.raises(RuntimeError, match="build"):
        GACD(HP).loss(student, [teacher], x, x_adv, y)


def test_declares_itself():
    assert GACD.teacher_set == "one" and GACD.needs_attack and GACD.features == "penultimate"
    assert set(GACD.space) == {"tau", "distill_weight"}
    assert set(GACD.paper_default) <= set(GACD.space)
    for key, value in GACD.paper_default.items():
        assert GACD.space[key].low <= value <= GACD.space[key].high
    assert GACD.fidelity.checked == "reconstruction" and GACD.fidelity.departures
    with pytest.raises(ValueError, match="distill_weight"):
        GACD({"tau": 0.1})
