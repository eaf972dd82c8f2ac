"""The GPU fast path (sweep/fast.py), checked on a CPU with small tensors: bf16 autocast of the
training forwards, channels_last, torch.compile wiring, one teacher pass per (teacher, input)
per batch, input-only gradients in attacks, and the divergence guard without per-step syncs."""

from __future__ import annotations

import copy
import gc
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LinearLogits
from torch import nn

from sweep import fast
from sweep.attacks import ce_objective, fgsm, kl_objective, mifgsm, pgd
from sweep.data import DATASETS, Splits
from sweep.fast import OFF, FastPath, maybe_compile, prepare, resolve, training_forwards
from sweep.losses import soft_kl
from sweep.methods import METHODS
from sweep.methods.advfunmatch import StudentTeacher
from sweep.methods.base import TeacherOutputs
from sweep.methods.dkd import _split
from sweep.models import build_model, forward_features
from sweep.spec import ComputeSpec
from sweep.training import Diverged, make_optimization, train_epoch

BF16 = FastPath(dtype=torch.bfloat16)
EPS = 0.1
HP = {
    "kd": {"temperature": 2.0, "alpha": 0.5},
    "ard": {"temperature": 2.0, "alpha": 0.5},
    "rslad": {"adv_weight": 5 / 6},
    "iad": {"temperature": 2.0, "alpha": 0.8, "beta": 0.1, "warmup_frac": 0.0},
    "mtard": {"temperature": 2.0, "weight_lr": 0.025},
    "trades": {"beta": 6.0},
    "gacd": {"tau": 0.2, "distill_weight": 1.0},
    "dkd": {"temperature": 4.0, "alpha": 1.0, "beta": 8.0},
    "advfunmatch": {"temperature": 2.0},
    "ataka": {"temperature": 2.0},
}
TEACHERS = {"none": 0, "one": 1, "clean+robust": 2, "ensemble": 2}


def _net(seed: int, arch: str = "small_cnn", channels: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    mean, std = (0.5,) * channels, (0.25,) * channels
    return build_model(arch, in_channels=channels, num_classes=10, mean=mean, std=std)


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _batch(n: int = 16, seed: int = 0, channels: int = 1, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size, size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _attack(model, x, objective, start=None):
    return pgd(model, x, objective, eps=EPS, steps=2, start=start)


def _no_attack(model, x, objective):
    return x


def _step_loss(name: str, student, teachers, x, y, attack=_attack, seed: int = 0):
    """What run_trial's step does: x' from the method's inner maximisation, then its loss."""
    torch.manual_seed(seed)  # the attack's random start
    method = METHODS.get(name)(HP[name])
    method.build(student, teachers, x, n_train=len(x))  # as a trial does (gacd's heads)
    x_adv = method.adversarial(student, teachers, x, y, attack)
    return method.loss(student, teachers, x, x_adv, y)


def _digits_like(n: int = 64) -> Splits:
    info = DATASETS.get("digits")
    x, y = _batch(n, seed=1)
    return Splits(info, x, y, x[:0], y[:0], x[:0], y[:0])


# --- resolving compute: --------------------------------------------------------------------------


def test_auto_is_plain_fp32_on_a_cpu_and_explicit_settings_are_honoured():
    cpu = torch.device("cpu")
    assert resolve(ComputeSpec(), cpu) == OFF
    got = resolve(ComputeSpec(precision="bf16", channels_last="on", compile=True), cpu)
    assert got == FastPath(dtype=torch.bfloat16, channels_last=True, compile=True)
    assert resolve(ComputeSpec(precision="fp32", channels_last="off"), cpu) == OFF


def test_auto_means_bf16_and_channels_last_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    got = resolve(ComputeSpec(), torch.device("cuda"))
    assert got.dtype == torch.bfloat16 and got.channels_last and not got.compile


# --- bf16 autocast -------------------------------------------------------------------------------


def test_training_forwards_run_in_bf16_return_fp32_logits_and_are_restored():
    model = _net(0).eval()
    x, _ = _batch()
    seen = []
    model[1][0][0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))  # first conv
    with torch.no_grad():
        ref = model(x)
        with training_forwards(BF16, model):
            out = model(x)
            feats, logits = forward_features(model, x)
        after = model(x)
    assert seen == [torch.float32, torch.bfloat16, torch.bfloat16, torch.float32]
    assert out.dtype == logits.dtype == feats.dtype == torch.float32  # losses see fp32
    assert torch.equal(after, ref)  # evaluation after training runs as before
    assert torch.allclose(out, ref, atol=0.1, rtol=0.05)
    assert torch.equal(logits, out)


def test_fast_path_off_is_the_plain_forward_bit_for_bit():
    model = _net(0).eval()
    x, _ = _batch()
    plain = nn.Sequential(model[0], model[1])
    with torch.no_grad(), training_forwards(OFF, model):
        assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize("name", ["kd", "trades", "rslad", "gacd", "mtard", "advfunmatch"])
def test_bf16_losses_are_close_to_fp32(name):
    student = _net(0).train()
    teachers = [_frozen(_net(10 + k)) for k in range(TEACHERS[METHODS.get(name).teacher_set])]
    x, y = _batch()
    ref = _step_loss(name, student, teachers, x, y)
    with training_forwards(BF16, student, *teachers):
        got = _step_loss(name, student, teachers, x, y)
    assert got.dtype == torch.float32 and math.isfinite(got.item())
    assert got.item() == pytest.approx(ref.item(), rel=0.05, abs=1e-3)


def test_a_bf16_epoch_trains_on_cpu():
    """Backward through the autocast forwards, BN on bf16 activations, the SGD step."""
    data = _digits_like(32)
    student, teacher = _net(0), _frozen(_net(1))
    optim = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    optim |= {"batch_size": 16, "schedule": "cosine"}
    opt, sched = make_optimization(student, optim, 1, len(data.x_train))
    before = [p.detach().clone() for p in student.parameters()]
    with training_forwards(BF16, student, teacher):
        loss = train_epoch(
            student,
            data,
            batch_size=16,
            augmentation=None,
            step_loss=lambda x, y: _step_loss("kd", student, [teacher], x, y),
            optimizer=opt,
            schedule=sched,
        )
    assert math.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in student.parameters())  # fp32 master weights
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


# --- channels_last -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["small_cnn", "preact_resnet18"])
def test_channels_last_gives_the_same_logits_and_input_gradients(arch):
    channels = 3
    plain, fast_model = _net(0, arch, channels).eval(), _net(0, arch, channels).eval()
    prepare(fast_model, FastPath(channels_last=True))
    conv = next(m for m in fast_model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x, y = _batch(4, channels=channels, size=16)
    assert torch.allclose(fast_model(x), plain(x), atol=1e-5)
    g_plain = torch.autograd.grad(F.cross_entropy(plain(x.requires_grad_()), y), x)[0]
    x2 = x.detach().requires_grad_()
    g_fast = torch.autograd.grad(F.cross_entropy(fast_model(x2), y), x2)[0]
    # summation order differs between the NHWC and NCHW kernels (and a ReLU at ~0 may flip with
    # it): the same gradient up to rounding
    assert F.cosine_similarity(g_fast.flatten(), g_plain.flatten(), dim=0) > 0.9999
    # the state_dict is the plain model's (checkpoints and the teacher cache do not notice)
    assert fast_model.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(fast_model.state_dict())


# --- torch.compile -------------------------------------------------------------------------------


def test_compile_flag_compiles_the_student_in_place(monkeypatch):
    monkeypatch.setattr(fast, "COMPILE_BACKEND", "eager")  # inductor takes minutes on a CPU
    x, _ = _batch()
    model = _net(0).eval()
    assert maybe_compile(model, OFF) is model and model._compiled_call_impl is None
    with torch.no_grad():
        ref = model(x)
    assert maybe_compile(model, FastPath(compile=True)) is model
    assert model._compiled_call_impl is not None
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-6)
    assert "_orig_mod" not in "".join(model.state_dict())  # checkpoint keys unchanged
    # the next trial's student: a new instance, new weights, the same compiled code
    other = maybe_compile(_net(1).eval(), FastPath(compile=True))
    with torch.no_grad():
        assert torch.allclose(other(x), nn.Sequential(other[0], other[1])(x), atol=1e-6)


# --- one teacher pass per (teacher, input) per batch ----------------------------------------------


def _count_calls(model: nn.Module) -> list[int]:
    """Forward passes of a build_model network, counted at its classifier head: every pass,
    model(x) or forward_features(model, x), ends there exactly once."""
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += 1

    model[1].head.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize(
    ("name", "attack", "per_step"),
    [
        ("rslad", _attack, 1),  # T(x): inner maximisation and both loss terms
        ("iad", _no_attack, 1),  # x' is x: T(x) for the ARD term and the trust weight
        ("ard", _attack, 1),
        ("kd", _attack, 1),
        ("mtard", _attack, 1),  # each teacher once
        ("gacd", _attack, 1),
    ],
)
def test_teachers_run_once_per_training_step(name, attack, per_step):
    data = _digits_like()
    student = _net(0)
    teachers = [_frozen(_net(10 + k)) for k in range(TEACHERS[METHODS.get(name).teacher_set])]
    method = METHODS.get(name)(HP[name])
    # before the counters: build() runs each teacher once to read its feature width (gacd)
    method.build(student, teachers, data.x_train[:16], len(data.x_train))
    counters = [_count_calls(t) for t in teachers]
    optim = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0}
    optim |= {"batch_size": 16, "schedule": "constant"}
    opt, sched = make_optimization(student, optim, 1, len(data.x_train))

    def step_loss(x, y):
        x_adv = method.adversarial(student, teachers, x, y, attack)
        return method.loss(student, teachers, x, x_adv, y)

    train_epoch(
        student,
        data,
        batch_size=16,
        augmentation=None,
        step_loss=step_loss,
        optimizer=opt,
        schedule=sched,
    )
    steps = math.ceil(len(data.x_train) / 16)
    assert [c[0] for c in counters] == [per_step * steps] * len(teachers)
    gc.collect()
    assert len(method._teacher_outputs) == 0  # nothing outlives its batch


@torch.no_grad()
def _teacher_pass(teacher, x):
    """A separate, uncached teacher forward: the reference the shared outputs must match."""
    return teacher(x)


def test_shared_teacher_outputs_leave_the_losses_unchanged():
    """The loss with one shared T(x) equals the formula with a separate teacher pass per term."""
    student, teacher = _net(0).train(), _frozen(_net(1))
    twin = copy.deepcopy(student)  # the loss's train-mode passes move batch-norm statistics
    x, y = _batch()
    torch.manual_seed(0)
    m = METHODS.get("rslad")(HP["rslad"])
    x_adv = m.adversarial(student, [teacher], x, y, _attack)
    got = m.loss(student, [teacher], x, x_adv, y)
    torch.manual_seed(0)
    ref_adv = _attack(twin, x, kl_objective(_teacher_pass(teacher, x)))
    assert torch.equal(x_adv, ref_adv)
    w = HP["rslad"]["adv_weight"]
    t1, t2 = _teacher_pass(teacher, x), _teacher_pass(teacher, x)
    ref = w * soft_kl(twin(x_adv), t1) + (1 - w) * soft_kl(twin(x), t2)
    assert got.item() == ref.item()

    calls = _count_calls(teacher)
    got = METHODS.get("iad")(HP["iad"]).loss(student, [teacher], x, x, y)  # x' = x: shared
    assert calls[0] == 1
    # the same values in two other tensors: two teacher passes, the same loss
    separate = METHODS.get("iad")(HP["iad"]).loss(student, [teacher], x.clone(), x.clone(), y)
    assert calls[0] == 3
    assert got.item() == separate.item()


def test_teacher_outputs_are_recomputed_for_a_new_input_or_changed_teacher():
    cache = TeacherOutputs()
    teacher = _frozen(_net(1))
    calls = _count_calls(teacher)
    x, _ = _batch()
    a = cache.get(teacher, x, features=False)[1]
    assert cache.get(teacher, x, features=False)[1] is a and calls[0] == 1
    # the same values in another tensor: another input, another pass
    cache.get(teacher, x.clone(), features=False)
    assert calls[0] == 2
    # features after logits: one more pass, then the logits come from it
    feats, logits = cache.get(teacher, x, features=True)
    assert calls[0] == 3 and feats.shape == (len(x), 64)
    assert torch.equal(logits, a)
    assert cache.get(teacher, x, features=False)[1] is logits
    # the input modified in place: recomputed
    x.mul_(0.5)
    assert not torch.equal(cache.get(teacher, x, features=False)[1], logits)
    # the teacher's weights modified in place: recomputed
    before = cache.get(teacher, x, features=False)[1]
    with torch.no_grad():
        next(teacher.parameters()).mul_(2.0)
    assert not torch.equal(cache.get(teacher, x, features=False)[1], before)
    del x, a, feats, logits, before
    gc.collect()
    assert len(cache) == 0


# --- attacks: gradients w.r.t. the input only -----------------------------------------------------


@pytest.mark.parametrize("fast_path", [OFF, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("attack", [pgd, fgsm, mifgsm])
def test_attacks_leave_every_parameter_grad_none(attack, fast_path):
    student = _net(0).train()  # parameters require grad, as a student's do
    teacher = _net(1)  # even a teacher whose parameters were not frozen
    x, y = _batch()
    with training_forwards(fast_path, student, teacher):
        x_adv = attack(student, x, ce_objective(y), eps=EPS, steps=3)
        attack(StudentTeacher(student, teacher), x, lambda both: both.sum(), eps=EPS, steps=3)
    assert not torch.equal(x_adv, x)
    params = list(student.parameters()) + list(teacher.parameters())
    assert all(p.requires_grad for p in params)
    assert all(p.grad is None for p in params)
    assert student.training  # the attack's eval() is undone


def test_a_linear_model_attack_touches_no_parameter_grad():
    model = LinearLogits(torch.randn(64, 10))
    x, y = _batch()
    pgd(model, x, ce_objective(y), eps=EPS, steps=1)
    assert model.w.grad is None


# --- the divergence guard -------------------------------------------------------------------------


def _epoch_with_losses(values: list[float], check_every: int | None) -> float:
    """An epoch whose step k has loss values[k] (times a parameter, so backward has work)."""
    data = _digits_like(16 * len(values))
    w = nn.Parameter(torch.ones(()))
    opt = torch.optim.SGD([w], lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    it = iter(values)
    return train_epoch(
        nn.Identity(),
        data,
        batch_size=16,
        augmentation=None,
        step_loss=lambda x, y: w * next(it),
        optimizer=opt,
        schedule=sched,
        check_every=check_every,
    )


@pytest.mark.parametrize("check_every", [None, 1, 2, 50])
def test_a_non_finite_loss_still_raises_diverged(check_every):
    for bad in (float("nan"), float("inf")):
        with pytest.raises(Diverged):
            _epoch_with_losses([1.0, bad, 1.0], check_every)  # later steps finite again
        with pytest.raises(Diverged):
            _epoch_with_losses([1.0, 1.0, bad], check_every)  # last step, between two checks


def test_a_cpu_epoch_stops_at_the_first_non_finite_step():
    """On a CPU the flag is read every step (it costs nothing): no step runs after it."""
    seen = []
    data = _digits_like(64)
    w = nn.Parameter(torch.ones(()))
    opt = torch.optim.SGD([w], lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def step_loss(x, y):
        seen.append(len(seen))
        return w * (float("nan") if len(seen) == 2 else 1.0)

    with pytest.raises(Diverged, match="step 2"):
        train_epoch(
            nn.Identity(),
            data,
            batch_size=16,
            augmentation=None,
            step_loss=step_loss,
            optimizer=opt,
            schedule=sched,
        )
    assert seen == [0, 1]


def test_the_epoch_loss_is_the_example_weighted_mean_as_before():
    values = [0.125, 0.75, 1.5]  # exact in fp32, so the expected mean is exact too
    expected = sum(v * 16 for v in values) / 48
    assert _epoch_with_losses(values, 2) == expected


# --- no host sync in DKD's split -----------------------------------------------------------------


def test_dkd_split_by_gather_equals_the_boolean_mask():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 7, generator=g)
    y = torch.randint(0, 7, (32,), generator=g)
    mask = F.one_hot(y, 7).bool()
    binary, others = _split(logits, y)
    assert torch.equal(others, logits[~mask].view(32, 6))
    assert torch.equal(binary[:, 0], logits[mask])
    assert torch.equal(binary[:, 1], logits[~mask].view(32, 6).logsumexp(1))


# --- the dataset stays on the trial's device ------------------------------------------------------


def test_splits_are_loaded_and_moved_once_per_process(tmp_path):
    from conftest import tiny_spec_dict

    from sweep.context import get_splits
    from sweep.spec import parse_spec

    spec = parse_spec(tiny_spec_dict(tmp_path))
    a = get_splits(spec, torch.device("cpu"))
    assert get_splits(spec, torch.device("cpu")) is a
    assert a.x_train.device.type == "cpu"


# --- a whole trial on the fast path (CPU: bf16 autocast, channels_last, compile eager) -----------


def test_a_trial_runs_on_the_fast_path_and_evaluates_in_fp32(tmp_path, monkeypatch):
    from conftest import make_context, runs_of, tiny_spec_dict, trial_config

    from sweep import training, trial
    from sweep.spec import parse_spec

    monkeypatch.setattr(fast, "COMPILE_BACKEND", "eager")
    compiled, scopes = [], []
    real_compile, real_forwards = trial.maybe_compile, training.training_forwards

    def spy_compile(model, fp):
        compiled.append(model)
        return real_compile(model, fp)

    def spy_forwards(fp, *models):
        scopes.append((fp, models))
        return real_forwards(fp, *models)

    monkeypatch.setattr(trial, "maybe_compile", spy_compile)
    # the student's epoch: sweep.training.student_epoch -> fast_epoch -> training_forwards
    monkeypatch.setattr(training, "training_forwards", spy_forwards)
    spec = tiny_spec_dict(
        tmp_path,
        compute={"precision": "bf16", "channels_last": "on", "compile": True},
        teacher={"epochs": 1},
        budget={"trials_per_cell": 1, "epochs": 1, "grace_period": 1},
        evaluation={"attacks": ["fgsm"], "val_attack": "fgsm", "val_examples": 50},
    )
    spec["evaluation"]["test_examples"] = 50
    ctx = make_context(tmp_path, parse_spec(spec), experiment="f")
    reports = []
    trial.run_trial(ctx, trial_config(), lambda m, s: reports.append(m))
    assert math.isfinite(reports[-1]["train/loss"]) and 0 <= reports[-1]["val/robust_acc"] <= 1
    (student,) = compiled
    assert student._compiled_call_impl is not None
    assert student.channels_last and student.compute_dtype is None  # evaluation ran in fp32
    fp, models = scopes[-1]  # the student's epoch: student and teacher in bf16
    assert fp.dtype == torch.bfloat16 and models[0] is student and len(models) == 2
    assert models[1].channels_last and not any(p.requires_grad for p in models[1].parameters())
    (run,) = runs_of(ctx)
    assert run.info.status == "FINISHED"


# --- the student's training step: sweep.training.student_epoch ------------------------------------


def _closure_epoch(method, student, teachers, data, fp, opt, sched):
    """The step run_trial ran before student_epoch existed (its closures, verbatim), as the
    reference: the attack through run_attack, x in the models' format, the method's x' and loss,
    the epoch inside training_forwards."""
    from sweep.attacks import run_attack
    from sweep.fast import to_format

    def attack(model, x, objective):
        return run_attack("pgd", model, x, objective, eps=EPS, steps=2, step_size=None, norm="linf")

    def step_loss(x, y):
        x = to_format(x, fp)
        x_adv = method.adversarial(student, teachers, x, y, attack)
        return method.loss(student, teachers, x, x_adv, y)

    with training_forwards(fp, student, *teachers):
        return train_epoch(
            student,
            data,
            batch_size=16,
            augmentation=None,
            step_loss=step_loss,
            optimizer=opt,
            schedule=sched,
        )


@pytest.mark.parametrize(
    "fp", [OFF, FastPath(dtype=torch.bfloat16, channels_last=True)], ids=["fp32", "bf16+nhwc"]
)
@pytest.mark.parametrize("name", ["pgd_at", "kd", "mtard"])
def test_student_epoch_is_the_trials_former_step_bit_for_bit(name, fp):
    """Same seed: the same epoch loss and the same weights after it (MTARD: its adaptive weights
    too), teachers none, one and two; the per-model forwards restored after the epoch."""
    from sweep.training import TrainAttack, student_epoch

    data = _digits_like(32)
    optim = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    optim |= {"batch_size": 16, "schedule": "cosine"}
    n_teachers = TEACHERS[METHODS.get(name).teacher_set]
    out = []
    for new in (False, True):
        student = prepare(_net(0), fp)
        teachers = [prepare(_frozen(_net(1 + i)), fp) for i in range(n_teachers)]
        method = METHODS.get(name)(HP.get(name, {}))
        opt, sched = make_optimization(student, optim, 1, len(data.x_train))
        torch.manual_seed(0)  # shuffling and the attack's random start
        if new:
            attack = TrainAttack("pgd", EPS, steps=2, step_size=None, norm="linf")
            loss = student_epoch(
                method,
                student,
                teachers,
                data,
                attack=attack,
                fast=fp,
                batch_size=16,
                augmentation=None,
                optimizer=opt,
                schedule=sched,
            )
        else:
            loss = _closure_epoch(method, student, teachers, data, fp, opt, sched)
        assert student.compute_dtype is None and all(t.compute_dtype is None for t in teachers)
        out.append((loss, [p.detach().clone() for p in student.parameters()], method))
    (loss_a, weights_a, method_a), (loss_b, weights_b, method_b) = out
    assert math.isfinite(loss_a) and loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b, strict=True))
    for k, v in method_a.state_dict().items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(method_b.state_dict()[k]))


def test_fast_epoch_scopes_the_training_forwards_to_the_epoch():
    """Inside the epoch the student and the teachers run bf16 forwards (fp32 logits); before
    and after it, plain fp32 (the evaluation after an epoch is not on the fast path)."""
    from sweep.training import fast_epoch

    data = _digits_like(32)
    student, teacher = _net(0), _frozen(_net(1))
    optim = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    optim |= {"batch_size": 16, "schedule": "constant"}
    opt, sched = make_optimization(student, optim, 1, len(data.x_train))
    seen = []

    def step_loss(x, y):
        seen.append((student.compute_dtype, teacher.compute_dtype))
        return F.cross_entropy(student(x), y) + 0 * teacher(x).sum()

    loss = fast_epoch(
        student,
        data,
        fast=BF16,
        others=[teacher],
        batch_size=16,
        augmentation=None,
        step_loss=step_loss,
        optimizer=opt,
        schedule=sched,
    )
    assert math.isfinite(loss)
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2
    assert student.compute_dtype is None and teacher.compute_dtype is None
