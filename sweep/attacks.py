"""L-inf and L2 attacks in plain PyTorch, behind one registry.

The mechanics follow DESIGN.md §3.4: the attacked model is put in eval() (batch-norm statistics
untouched) and each submodule's own mode is restored afterwards; gradients are taken with
torch.autograd.grad with respect to the input only, so no parameter's .grad is touched; every
iterate is projected onto the eps-ball (L-inf or L2) and clipped to the data range [0, 1].

An attack maximises an *objective* (`AttackObjective`): a function of the model's logits on the
perturbed input that returns a scalar. The plain attack uses cross-entropy against the label;
distillation methods pass their own inner-maximisation objective (e.g. a KL against the teacher).
For *evaluation* each registered attack names the objective it is defined with
(`AttackInfo.objective`): CE for FGSM/PGD/MI-FGSM, the Carlini-Wagner margin for `cw_inf`.

Every attack function has the signature
`fn(model, x, objective, *, eps, steps, step_size=None, norm="linf", start=None, **params)`;
the ones that do not iterate ignore `steps`, and an unsupported `norm` is a ValueError naming
the allowed norms. `start` is the point the attack starts from instead of its own starting point
(x, or a random point of the ball): TRADES-style methods, whose objective is flat at x' = x,
start every attack at x + 0.001 * N(0, 1) as the authors' code does. Whatever the start, the
result is projected onto the eps-ball around x and into [0, 1]. `params` are the attack's own
parameters (MI-FGSM's decay), declared at registration (`AttackInfo.params`).

Each is registered at its definition, `@ATTACKS.register(name, summary=..., ...)`: these are the
training attacks (the grid's `train_attack` axis), also usable in `evaluation.attacks`. The
evaluation-only ones (AutoAttack) are in `sweep.evaluate.EVAL_ATTACKS`. Two sets of defaults:
the function's keyword defaults are the *evaluation* protocol (PGD: 2.5 * eps / steps, Madry et
al.), and `AttackInfo.train_steps` / `train_step` are the *training* protocol of the robust-KD
literature (10 PGD steps of eps/4, DESIGN §4.1), applied by `sweep.attack_defs.TrainAttackSpec`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry

AttackObjective = Callable[[torch.Tensor], torch.Tensor]

NORMS = ("linf", "l2")
# Carlini-Wagner confidence used by `cw_inf`; see `cw_inf_objective` for why 50.
CW_KAPPA = 50.0
# Guards divisions by a per-example norm that can be exactly zero (a saturated or flat loss).
_TINY = 1e-12


def ce_objective(y: torch.Tensor) -> AttackObjective:
    """Sum (not mean) so a per-example gradient does not shrink with the batch size."""
    return lambda logits: F.cross_entropy(logits, y, reduction="sum")


def kl_objective(target_logits: torch.Tensor) -> AttackObjective:
    """objective(logits) = sum_i KL(softmax(target_i) || softmax(logits_i)), the target detached:
    the inner maximisation of TRADES-style methods (and RSLAD's, with the teacher as target).
    Summed over the batch, as `ce_objective`."""
    log_p = F.log_softmax(target_logits.detach(), dim=1)
    return lambda logits: F.kl_div(
        F.log_softmax(logits, dim=1), log_p, reduction="sum", log_target=True
    )


def cw_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example, max_{j != y} z_j - z_y: positive exactly when the example is misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    is_true = F.one_hot(y, logits.shape[1]).bool()
    other = logits.masked_fill(is_true, float("-inf")).amax(1)
    return other - true


def cw_objective(y: torch.Tensor, kappa: float = 0.0) -> AttackObjective:
    """Carlini & Wagner (2017), f_6 untargeted: sum_i min(max_{j != y_i} z_ij - z_{i,y_i}, kappa).

    Maximising it is minimising CW's max(z_y - max_{j != y} z_j, -kappa): the margin is pushed
    until the wrong class leads by kappa, then the example stops moving (its gradient is zero).
    This equals the robustness codes' `cwloss` (CAT -> MART, FAT/GAIRAT, RSLAD, IAD),
    -clamp(z_y - max_{j != y} z_j + kappa, min=0), plus the constant kappa per example, so the
    gradients (and every attack step) are the same. Why a margin and not CE: its gradient does
    not vanish when the softmax saturates, so it exposes gradient masking that fools CE-PGD.
    Summed over the batch, as `ce_objective`, so per-example gradients do not depend on the batch.
    """
    return lambda logits: cw_margin(logits, y).clamp(max=kappa).sum()


def cw_inf_objective(y: torch.Tensor, kappa: float = CW_KAPPA) -> AttackObjective:
    """The objective of the registered `cw_inf`: the CW margin with kappa = CW_KAPPA = 50 (its
    declared parameter `kappa`).

    Why 50 and not CW's default 0: 50 is what the evaluation code behind the robust-KD numbers
    users compare with uses (the `cwloss(..., confidence=50)` of CAT/MART/RSLAD/IAD), i.e. in
    practice the unclamped margin; with kappa = 0 an example stops exactly at the decision
    boundary, where a later forward pass in another precision or batch size can flip it back.
    """
    return cw_objective(y, kappa=kappa)


@dataclass(frozen=True)
class AttackParam:
    """An attack's own parameter (MI-FGSM's decay): its default, bounds (None = unbounded,
    inclusive), and what it does. `training`: whether it can act in a training attack. False
    for a parameter of the attack's evaluation objective (cw_inf's kappa): in training the
    method supplies the objective, so the parameter would be silently ignored; the sweep file
    rejects it there instead."""

    default: float
    low: float | None = None
    high: float | None = None
    doc: str = ""
    training: bool = True

    def check(self, value: object) -> str | None:
        """None if `value` is acceptable, else why not (for the sweep file's error message)."""
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            return f"must be a number (got {value!r})"
        if self.low is not None and value < self.low:
            return f"must be >= {self.low:g} (got {value})"
        if self.high is not None and value > self.high:
            return f"must be <= {self.high:g} (got {value})"
        return None


@dataclass(frozen=True)
class StepRule:
    """A training step size: `scale` * eps, divided by the number of steps when `per_step`.

    Why a rule and not a number: the step is a fraction of the budget in every paper (PGD eps/4,
    FGSM-RS 1.25 * eps, MI-FGSM eps/steps), so it follows the sweep's eps and steps."""

    scale: float
    per_step: bool = False

    def __call__(self, eps: float, steps: int) -> float:
        return self.scale * eps / (steps if self.per_step else 1)

    def describe(self) -> str:
        """'eps/4', '1.25*eps', 'eps/steps': how `sweep validate` prints the rule."""
        inv = 1.0 / self.scale
        if self.scale == 1.0:
            base = "eps"
        elif self.scale < 1.0 and abs(inv - round(inv)) < 1e-9:
            base = f"eps/{round(inv)}"
        else:
            base = f"{self.scale:g}*eps"
        return base + ("/steps" if self.per_step else "")


@dataclass(frozen=True)
class AttackInfo:
    """A registered attack.

    `iterative`: whether it takes `steps`. `objective`: y -> the loss it maximises when used for
    evaluation (training-time callers pass their method's own). `norms`: the threat models it
    implements. Training protocol (what `sweep.attack_defs` uses unless the sweep file sets it
    for this attack): `train_steps` (None: not iterative) and `train_step`, the step-size rule
    (None: the attack takes no step, `none`). `params`: its own parameters, passed to `fn` as
    keywords, whose defaults equal `fn`'s keyword defaults.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    summary: str
    iterative: bool = False
    objective: Callable[..., AttackObjective] = ce_objective
    norms: tuple[str, ...] = ("linf",)
    train_steps: int | None = None
    train_step: StepRule | None = None
    # the evaluation step when the file sets none: the function's own default, declared so that
    # `sweep validate` can print it (tests check the two agree)
    eval_step: StepRule | None = None
    params: Mapping[str, AttackParam] = field(default_factory=dict)


ATTACKS: Registry[AttackInfo] = Registry("attack", entry=AttackInfo)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluate in eval() and restore each submodule's own mode afterwards."""
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode


def attack_view(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` in eval mode with each convolution's batch norm folded into it,
    for computing attack gradients during evaluation.

    Why: in eval mode a batch norm is a fixed affine map, so conv + BN is one convolution with
    rescaled weights: the same function (logits agree to ~1e-6) with a fifth fewer kernels to run
    forward and backward. On 2 CPU cores this makes PGD on ResNet-18 about 1.5x faster
    (bench/pgd_throughput.py). The copy's parameters do not require grad, so autograd tracks the
    input only. Callers judge correctness with the real model; the view only steers the attack.
    Pre-activation nets (BN before its conv) keep those BNs; a model torch.fx cannot trace is
    returned as a frozen copy, unfolded. `model` itself is not changed.
    """
    import copy

    from torch.fx.experimental.optimization import fuse

    with eval_mode(model):
        try:
            view = fuse(model, inplace=False)
        except Exception:  # not symbolically traceable: attack an unfolded copy
            view = copy.deepcopy(model)
    view.eval()
    for p in view.parameters():
        p.requires_grad_(False)
    return view


def input_grad(model: nn.Module, x: torch.Tensor, objective: AttackObjective) -> torch.Tensor:
    """d objective(model(x)) / dx, taken w.r.t. the input only (no parameter's .grad is touched).

    The caller chooses the model's mode; the attacks below call it inside `eval_mode`.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = objective(model(x))
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def _per_example(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A value per example, shaped (N, 1, 1, ...) to broadcast against `like`."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _per_example_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    """The p-norm of each example, shaped (N, 1, 1, ...) to broadcast against t."""
    return _per_example(t.flatten(1).norm(p=p, dim=1), t)


def _mean_abs(t: torch.Tensor) -> torch.Tensor:
    """||t||_1 / d of each example, shaped (N, 1, 1, ...)."""
    return _per_example(t.abs().flatten(1).mean(1), t)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Onto the L-inf eps-ball around x, then into the data range [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def project_l2(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Onto the L2 eps-ball around x (per-example rescaling), then into [0, 1].

    Clipping after the rescaling cannot leave the ball: x is in [0, 1], so clipping only moves
    each coordinate of x_adv towards x's.
    """
    delta = x_adv - x
    scale = (eps / _per_example_norm(delta, 2).clamp_min(_TINY)).clamp(max=1.0)
    return (x + delta * scale).clamp_(0.0, 1.0)


_PROJECT: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "linf": project,
    "l2": project_l2,
}


def check_norm(attack: str, norm: str, allowed: tuple[str, ...]) -> None:
    """Fail loudly: an L2 budget silently run as L-inf would report the wrong threat model."""
    if norm not in allowed:
        raise ValueError(
            f"attack {attack!r} does not support norm {norm!r}; allowed: {', '.join(allowed)}"
        )


def uniform_in_ball(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """A point uniform in the eps-ball around x (then clipped to [0, 1]).

    L-inf: each coordinate uniform in [-eps, eps] (Madry et al. 2018). L2: a direction uniform on
    the sphere (a normalised Gaussian) and radius eps * U^(1/d), d the number of coordinates, which
    is uniform in the ball's volume (a uniform radius would crowd the points near the centre).
    """
    if norm == "linf":
        return project(x + torch.empty_like(x).uniform_(-eps, eps), x, eps)
    direction = torch.randn_like(x)
    direction = direction / _per_example_norm(direction, 2).clamp_min(_TINY)
    d = math.prod(x.shape[1:])
    radius = eps * torch.rand(direction.shape[0], device=x.device, dtype=x.dtype) ** (1.0 / d)
    return project_l2(x + direction * _per_example(radius, x), x, eps)


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of unit norm for the threat model: sign(g) for L-inf (the
    maximiser of <g, d> over the unit L-inf ball), g / ||g||_2 per example for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / _per_example_norm(grad, 2).clamp_min(_TINY)


def _starting_point(x: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor:
    """The caller's `start` if given (detached; not projected: the authors' TRADES takes its
    first gradient at x + 0.001 * N(0, 1) unclipped), else the clean input."""
    return x.clone() if start is None else start.detach()


@ATTACKS.register("none", summary="clean inputs", norms=NORMS)
def no_attack(
    model: nn.Module, x: torch.Tensor, objective: AttackObjective, **_: object
) -> torch.Tensor:
    """x unchanged. A `start` is ignored: the `none` cell trains on clean inputs, whatever the
    method (a start of x + 0.001 * N(0, 1) is not an attack, only where an attack begins)."""
    return x


@ATTACKS.register(
    "fgsm",
    summary="FGSM, one step of size eps",
    train_step=StepRule(1.0),
    eval_step=StepRule(1.0),
)
def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    objective: AttackObjective,
    *,
    eps: float,
    steps: int = 1,
    step_size: float | None = None,
    norm: str = "linf",
    start: torch.Tensor | None = None,
    **_: object,
) -> torch.Tensor:
    """Goodfellow et al. 2015: one signed-gradient step of size eps from the clean input.

    `steps` is ignored; `step_size` (default eps) overrides the step, projected back to the ball.
    `start` replaces the clean input as the point where the gradient is taken and the step made
    (TRADES's x + 0.001 * N(0, 1): at x itself its objective is flat).
    """
    check_norm("fgsm", norm, ("linf",))
    alpha = step_size if step_size is not None else eps
    x = x.detach()
    x0 = _starting_point(x, start)
    with eval_mode(model):
        grad = input_grad(model, x0, objective)
    return project(x0 + alpha * grad.sign(), x, eps).detach()


@ATTACKS.register(
    "cw_inf",
    summary="CW-inf: L-inf PGD on the Carlini-Wagner margin, kappa=50",
    iterative=True,
    objective=cw_inf_objective,
    train_steps=10,
    train_step=StepRule(0.25),
    eval_step=StepRule(2.5, per_step=True),
    params={
        "kappa": AttackParam(
            CW_KAPPA,
            low=0.0,
            training=False,
            doc="CW confidence of the evaluation objective (cw_inf_objective); a training "
            "attack climbs the method's own inner objective, so it does not apply there",
        )
    },
)
@ATTACKS.register(
    "pgd",
    summary="PGD (L-inf or L2) with random start",
    iterative=True,
    norms=NORMS,
    train_steps=10,
    train_step=StepRule(0.25),
    eval_step=StepRule(2.5, per_step=True),
)
def pgd(
    model: nn.Module,
    x: torch.Tensor,
    objective: AttackObjective,
    *,
    eps: float,
    steps: int,
    step_size: float | None = None,
    norm: str = "linf",
    random_start: bool = True,
    start: torch.Tensor | None = None,
    **_: object,
) -> torch.Tensor:
    """Madry et al. 2018: projected steepest ascent from a uniform random start in the ball.

    L-inf steps along sign(g), L2 steps along g / ||g||_2 (per example); each iterate is projected
    onto the ball and [0, 1]. The default step size 2.5 * eps / steps is Madry et al.'s rule,
    for both norms: enough to reach the ball's boundary from anywhere inside it; it is the
    evaluation default. Training uses the robust-KD protocol instead, 10 steps of eps/4
    (`AttackInfo.train_step`; 2/255 at 8/255 for ARD, IAD, RSLAD, MTARD; TRADES's 0.007).
    `start` replaces the random start (TRADES starts at x + 0.001 * N(0, 1)).
    """
    check_norm("pgd", norm, NORMS)
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    proj = _PROJECT[norm]
    x = x.detach()
    if start is not None or not random_start:
        x_adv = _starting_point(x, start)
    else:
        x_adv = uniform_in_ball(x, eps, norm)
    with eval_mode(model):
        for _ in range(steps):
            grad = input_grad(model, x_adv, objective)
            x_adv = proj(x_adv + alpha * ascent_direction(grad, norm), x, eps)
    return x_adv.detach()


@ATTACKS.register(
    "fgsm_rs",
    summary="FGSM from a random start, step 1.25*eps (Wong et al. 2020)",
    train_step=StepRule(1.25),
    eval_step=StepRule(1.25),
)
def fgsm_rs(
    model: nn.Module,
    x: torch.Tensor,
    objective: AttackObjective,
    *,
    eps: float,
    steps: int = 1,
    step_size: float | None = None,
    norm: str = "linf",
    start: torch.Tensor | None = None,
    **_: object,
) -> torch.Tensor:
    """Wong, Rice & Kolter 2020 ("Fast is better than free"): FGSM from a uniform random start.

    One signed step of alpha = 1.25 * eps (their recommended value; `step_size` overrides) from a
    point uniform in the L-inf ball, projected to the ball and [0, 1]. The random start is what
    lets single-step adversarial training avoid catastrophic overfitting. `steps` is ignored.
    This is one step of `pgd` with that step size, and is implemented as exactly that. A
    `start` replaces the uniform one (then it is one FGSM step of 1.25 * eps from `start`).
    """
    check_norm("fgsm_rs", norm, ("linf",))
    alpha = step_size if step_size is not None else 1.25 * eps
    return pgd(
        model, x, objective, eps=eps, steps=1, step_size=alpha, random_start=True, start=start
    )


@ATTACKS.register(
    "mifgsm",
    summary="MI-FGSM, momentum 1.0, step eps/steps (Dong et al. 2018)",
    iterative=True,
    train_steps=10,
    train_step=StepRule(1.0, per_step=True),
    eval_step=StepRule(1.0, per_step=True),
    params={
        "decay": AttackParam(
            1.0, low=0.0, doc="momentum mu of the accumulated gradient (Dong et al.: 1.0)"
        )
    },
)
def mifgsm(
    model: nn.Module,
    x: torch.Tensor,
    objective: AttackObjective,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    decay: float = 1.0,
    start: torch.Tensor | None = None,
    **_: object,
) -> torch.Tensor:
    """Dong et al. 2018 (MI-FGSM): signed steps along an accumulated, normalised gradient.

    g <- decay * g + grad / mean|grad| (per example; the paper divides by ||grad||_1, torchattacks
    by mean|grad|: every term then differs by the same factor d, so sign(g) is the same), then
    x <- proj(x + step * sign(g)), from the clean input (no random start), step = eps / steps
    (`step_size` overrides) and decay mu = 1.0 as in the paper. The normalisation makes every
    iteration's gradient count equally in the momentum, whatever its scale. `start` replaces the
    clean input as the first iterate (the momentum still starts at zero).
    """
    check_norm("mifgsm", norm, ("linf",))
    alpha = step_size if step_size is not None else eps / steps
    x = x.detach()
    x_adv = _starting_point(x, start)
    g = torch.zeros_like(x)
    with eval_mode(model):
        for _ in range(steps):
            grad = input_grad(model, x_adv, objective)
            g = decay * g + grad / _mean_abs(grad).clamp_min(_TINY)
            x_adv = project(x_adv + alpha * g.sign(), x, eps)
    return x_adv.detach()


def param_problem(name: str, key: str, value: object, *, training: bool = False) -> str | None:
    """Why `key=value` is not a valid parameter of attack `name` (and, for a training attack,
    usable in training), or None. The message names the allowed parameters, not `key` itself,
    so callers can prefix where it was written (`mifgsm.params.decy: ...`)."""
    declared = ATTACKS.get(name).params
    if key not in declared:
        allowed = ", ".join(sorted(declared)) or "none"
        return f"not a parameter of attack {name!r}; allowed: {allowed}"
    decl = declared[key]
    if training and not decl.training:
        return f"does not apply to a training attack: {decl.doc}"
    return decl.check(value)


def check_params(name: str, params: Mapping[str, object], *, training: bool = False) -> None:
    """A ValueError naming the attack and the parameter for the first bad one. Why: the attack
    functions swallow unknown keywords (`**_`), so a misspelt `decy` would otherwise be
    silently ignored."""
    for key, value in params.items():
        problem = param_problem(name, key, value, training=training)
        if problem:
            raise ValueError(f"parameter {key!r}: {problem}")


@dataclass(frozen=True)
class Ball:
    """What a particle search (CAP's corners, AT-AKA's SVGD) takes from the cell's training
    attack (a `training.TrainAttack`): the eps-ball and its norm, the number of steps and the
    step size (PGD's training rule, eps / 4, when unset)."""

    eps: float
    norm: str
    steps: int
    step_size: float

    @classmethod
    def of(cls, attack: Any, method: str) -> Ball:
        if not all(hasattr(attack, a) for a in ("eps", "norm", "steps", "step_size")):
            raise TypeError(
                f"{method} runs its own particle search and needs the cell's training attack "
                f"(a training.TrainAttack with eps, norm, steps, step_size), got {attack!r}"
            )
        if attack.norm not in _PROJECT:
            raise ValueError(f"{method}: norm {attack.norm!r}; allowed: {', '.join(_PROJECT)}")
        step = attack.step_size
        if step is None:  # as `TrainAttackSpec.resolve` would: the PGD training rule
            step = ATTACKS.get("pgd").train_step(attack.eps, attack.steps)
        return cls(float(attack.eps), attack.norm, int(attack.steps), float(step))

    def starts(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """[n, *x.shape]: n points uniform in the ball around each example, in [0, 1]."""
        reps = x.detach().unsqueeze(0).expand(n, *x.shape).reshape(n * len(x), *x.shape[1:])
        return uniform_in_ball(reps, self.eps, self.norm).reshape(n, *x.shape)

    def step(self, p: torch.Tensor, x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """One projected ascent step of every particle p[n] (around x) along `direction`:
        sign for L-inf, L2-normalised per particle for L2."""
        flat = p.flatten(0, 1)
        d = ascent_direction(direction.flatten(0, 1), self.norm)
        centre = x.unsqueeze(0).expand_as(p).flatten(0, 1)
        return _PROJECT[self.norm](flat + self.step_size * d, centre, self.eps).reshape_as(p)


def run_attack(
    name: str,
    model: nn.Module,
    x: torch.Tensor,
    objective: AttackObjective,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    start: torch.Tensor | None = None,
    **params: float,
) -> torch.Tensor:
    """Run the registered attack `name`; its norms and `params` are checked here so the error
    names it. `params` are keywords of the attack function (not of its evaluation objective:
    cw_inf's kappa is rejected, since the caller passes the objective)."""
    info = ATTACKS.get(name)
    check_norm(name, norm, info.norms)
    check_params(name, params, training=True)
    return info.fn(
        model,
        x,
        objective,
        eps=eps,
        steps=steps,
        step_size=step_size,
        norm=norm,
        start=start,
        **params,
    )
