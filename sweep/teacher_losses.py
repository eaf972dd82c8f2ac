"""Teacher losses (DESIGN.md §4, the first grid axis), behind one registry.

Why classes rather than functions of (logits, labels): some losses keep state across batches
(`mcmi`'s running centroids, `cmic`'s per-epoch centroids), need the whole training split before
the first epoch (`cmic`'s initial centroids and class priors), or run the model themselves on
inputs other than the batch (`pgd_at`, `trades`). One instance trains one teacher.

Adding a loss: a TeacherLoss subclass here, decorated with `@TEACHER_LOSSES.register("<name>")`,
declaring its `fidelity` (how it was checked against its source, sweep/fidelity.py) and, where the
paper's teacher is not trained from scratch, its `default_start` (a FinetuneRecipe: `mcmi`
fine-tunes a CE teacher, as its authors do).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import ce_objective, eval_mode, kl_objective, pgd
from .cmi import class_centroids, floored_log, full_pass_centroids
from .fidelity import UNDECLARED, Fidelity
from .losses import trades_loss
from .registry import Registry
from .space import MAX_STEPS


@dataclass(frozen=True)
class LossParam:
    """A teacher-loss parameter: its default, bounds (None = unbounded; `low` inclusive, `high`
    inclusive unless `high_open`), integrality; or, with `choices`, one of a few named options
    (a string parameter: `mcmi`'s `centroids: full_pass | ema`)."""

    default: float | int | str | None
    low: float | None = None
    high: float | None = None
    integer: bool = False
    doc: str = ""
    high_open: bool = False  # [low, high): a smoothing or a momentum of 1 is meaningless
    choices: tuple[str, ...] = ()  # non-empty: the value must be one of these names

    def check(self, value: Any) -> str | None:
        """None if `value` is acceptable, else why not (for the sweep file's error message)."""
        if self.choices:
            if value not in self.choices:
                return f"must be one of {', '.join(self.choices)} (got {value!r})"
            return None
        if value is None:
            return None if self.default is None else "must be set (got None)"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be {'an integer' if self.integer else 'a number'} (got {value!r})"
        if self.integer and not isinstance(value, int):
            return "must be an integer"
        if not math.isfinite(value):
            return f"must be a finite number (got {value})"
        if self.low is not None and value < self.low:
            return f"must be >= {self.low} (got {value})"
        if self.high is not None and self.high_open and value >= self.high:
            return f"must be < {self.high} (got {value})"
        if self.high is not None and value > self.high:
            return f"must be <= {self.high} (got {value})"
        return None


@dataclass(frozen=True)
class FinetuneRecipe:
    """How a loss's paper makes its teacher when that is not from scratch: fine-tune a teacher
    trained with `start_from` (with the sweep's teacher defaults) for `epochs`, with `optim`
    overriding the sweep's `teacher.optim` (and `optim_by_arch[arch]` on top for that arch).

    Why on the loss: the recipe is part of what the paper means by the loss (MCMI's gains are
    those of a fine-tuned CE teacher), so `{name: mcmi}` must mean it without the sweep file
    saying so; teacher_defs applies it, `finetune: null` opts out (from scratch)."""

    start_from: str
    epochs: int
    optim: Mapping[str, Any]
    optim_by_arch: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: str = ""

    def optim_for(self, arch: str) -> dict[str, Any]:
        return dict(self.optim) | dict(self.optim_by_arch.get(arch, {}))


# What `begin` may be given to see training batches as training will: the batch augmentation.
Augment = Callable[[torch.Tensor], torch.Tensor] | None


class TeacherLoss:
    """One instance trains one teacher; it may keep state (centroids) across batches/epochs.
    Subclasses are registered with `@TEACHER_LOSSES.register("<name>")`, which sets `name`.

    Call order: begin(...) once with the whole training split, then per epoch loss(...) on each
    batch (model in train() mode) followed by end_epoch().
    """

    name: ClassVar[str]  # the registry key, set by @TEACHER_LOSSES.register
    summary: ClassVar[str]
    params: ClassVar[dict[str, LossParam]] = {}
    adversarial: ClassVar[bool] = False  # trains on adversarial examples (pgd_at, trades)
    fidelity: ClassVar[Fidelity] = UNDECLARED
    default_start: ClassVar[FinetuneRecipe | None] = None  # None: trained from scratch

    def __init__(self, params: dict[str, Any], num_classes: int) -> None:
        missing = sorted(set(self.params) - set(params))
        unknown = sorted(set(params) - set(self.params))
        if missing or unknown:
            raise ValueError(
                f"teacher loss {self.name!r}: missing parameters {missing}, unknown {unknown}; "
                f"expected exactly {sorted(self.params)}"
            )
        for key, spec in self.params.items():
            problem = spec.check(params[key])
            if problem:
                raise ValueError(f"teacher loss {self.name!r}: {key} {problem}")
        self.p = dict(params)
        self.num_classes = num_classes

    def begin(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        augment: Augment = None,
    ) -> None:
        """Before the first epoch, with the whole training split (un-augmented) and the batch
        augmentation training will apply (`augment`, None when there is none)."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def end_epoch(self) -> None:
        """After the last batch of each epoch."""

    @classmethod
    def describe(cls) -> dict[str, Any]:
        recipe = cls.default_start
        return {
            "summary": cls.summary,
            "adversarial": cls.adversarial,
            "params": {
                k: {
                    "default": p.default,
                    "low": p.low,
                    "high": p.high,
                    "high_open": p.high_open,
                    "integer": p.integer,
                    "doc": p.doc,
                }
                | ({"choices": list(p.choices)} if p.choices else {})
                for k, p in cls.params.items()
            },
            "fidelity": cls.fidelity.describe() | {"tag": cls.fidelity.tag()},
            "default_start": None
            if recipe is None
            else {
                "finetune_from": recipe.start_from,
                "epochs": recipe.epochs,
                "optim": dict(recipe.optim),
                "optim_by_arch": {a: dict(o) for a, o in recipe.optim_by_arch.items()},
                "source": recipe.source,
            },
        }


TEACHER_LOSSES: Registry[type[TeacherLoss]] = Registry("teacher loss")


@TEACHER_LOSSES.register("ce")
class CrossEntropy(TeacherLoss):
    summary = "cross-entropy (maximum likelihood)"
    fidelity = Fidelity(
        "authors-code",
        "cross-entropy, mean over the batch, as the CE teachers of the MCMI (Ye et al. 2024) "
        "and ECCV 2024 (Hamidi et al.) code",
    )

    def loss(self, model, x, y) -> torch.Tensor:
        return F.cross_entropy(model(x), y)


@TEACHER_LOSSES.register("mse")
class MSE(TeacherLoss):
    """Hamidi et al. (ECCV 2024): squared error between the softmax probabilities and the one-hot
    label, summed over classes and averaged over the batch (the Brier score). On probabilities,
    not logits: the authors' released code trains with CE here by mistake."""

    summary = "MSE between softmax probabilities and one-hot labels (Hamidi et al. 2024)"
    fidelity = Fidelity(
        "authors-code",
        "Hamidi et al., ECCV 2024, 'How to Train the Teacher Model for Effective Knowledge "
        "Distillation', and its released code (read 2026-11, DESIGN section 4.1)",
        (
            "the released code always trains CE (its switch compares a method to a string) and "
            "its intended path is nn.MSELoss on logits; ours is the paper's definition, squared "
            "error of the softmax probabilities to one-hot (the Brier score)",
        ),
    )

    def loss(self, model, x, y) -> torch.Tensor:
        p = F.softmax(model(x), dim=1)
        onehot = F.one_hot(y, num_classes=p.shape[1]).to(p.dtype)
        return (p - onehot).pow(2).sum(dim=1).mean()


@TEACHER_LOSSES.register("label_smoothing")
class LabelSmoothing(TeacherLoss):
    """CE against (1 - s) * onehot + s / C, i.e. (1 - s) * CE + s * mean_k(-log p_k)."""

    summary = "cross-entropy against smoothed labels (1-s)*onehot + s/C"
    fidelity = Fidelity(
        "authors-code",
        "Szegedy et al., CVPR 2016 (label smoothing); the target (1-s)*onehot + s/C of "
        "torch.nn.functional.cross_entropy(label_smoothing=s), as the teacher-loss papers' code",
    )
    params = {
        "smoothing": LossParam(0.1, low=0.0, high=1.0, high_open=True, doc="s, in [0, 1)"),
    }

    def loss(self, model, x, y) -> torch.Tensor:
        return F.cross_entropy(model(x), y, label_smoothing=self.p["smoothing"])


def _kl_to(log_p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(P || Q) from log P (stable, from log_softmax) and the probabilities Q."""
    return (log_p.exp() * (log_p - floored_log(q))).sum(dim=1)


@TEACHER_LOSSES.register("mcmi")
class MCMI(TeacherLoss):
    """Ye et al. (ICLR 2024): CE - lambda * CMI_Q, maximising the conditional mutual information
    so the teacher's outputs carry more of the class-conditional structure a student learns from.

    CMI_Q = mean_i KL(P_i || Q_{y_i}), Q detached (no gradient goes through the centroids).

    `centroids: full_pass` (default, the authors' recipe): `begin` computes Q once, as the class
    means of the softmax outputs over one no-grad pass of the augmented training split with the
    model in train mode (as their code: batch-norm uses, and updates, batch statistics), and Q
    stays frozen for the whole fine-tuning. Their per-batch update is commented out.

    `centroids: ema` (ours, for a teacher trained from scratch, where a frozen Q of a random
    network would mean nothing): Q is updated after each batch as an EMA (`momentum`) of the
    batch's class means; a batch's loss uses Q as it was before that batch's update; a class's
    first update sets its centroid to its batch mean, until then it is uniform.

    The default start (`default_start`) is the authors': fine-tune a CE teacher 20 epochs, batch
    64, SGD momentum 0.9, weight decay 5e-4, lr 0.05 (0.005 for MobileNetV2), cosine.
    """

    summary = "CE - lambda*CMI to class centroids, fine-tuning a CE teacher (Ye et al. 2024)"
    params = {
        "lambda": LossParam(0.25, low=0.0, doc="weight of the CMI term (0.25 in every script)"),
        "centroids": LossParam(
            "full_pass",
            choices=("full_pass", "ema"),
            doc="full_pass: class means of one pass before training, frozen (the authors'); "
            "ema: per-batch EMA (ours, for training from scratch)",
        ),
        "momentum": LossParam(
            0.9, low=0.0, high=1.0, high_open=True, doc="EMA momentum (centroids: ema only)"
        ),
    }
    fidelity = Fidelity(
        "authors-code",
        "Ye et al., ICLR 2024, 'Bayes Conditional Distribution Estimation for Knowledge "
        "Distillation'; the authors' ICLRMCMI code (read 2026-11, DESIGN section 4.1)",
        (
            "centroids: ema (per-batch EMA of the centroids) is ours, offered for teachers trained "
            "from scratch; the default full_pass is the authors'",
        ),
    )
    default_start = FinetuneRecipe(
        start_from="ce",
        epochs=20,
        optim={
            "optimizer": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "batch_size": 64,
            "schedule": "cosine",
        },
        optim_by_arch={"mobilenetv2": {"lr": 0.005}},
        source="the ICLRMCMI scripts: a 240-epoch CE teacher fine-tuned 20 epochs",
    )

    def __init__(self, params: dict[str, Any], num_classes: int) -> None:
        super().__init__(params, num_classes)
        self.centroids = torch.full((num_classes, num_classes), 1.0 / num_classes)
        self.seen = torch.zeros(num_classes, dtype=torch.bool)
        self.frozen = self.p["centroids"] == "full_pass"
        self.ready = not self.frozen  # full_pass: begin() must run first

    def begin(self, model, x, y, batch_size, augment=None) -> None:
        if self.frozen:
            self.centroids = full_pass_centroids(
                model, x, y, self.num_classes, batch_size, augment=augment
            )
            self.ready = True

    def loss(self, model, x, y) -> torch.Tensor:
        if not self.ready:
            raise RuntimeError("mcmi (centroids: full_pass): call begin() before the first epoch")
        logits = model(x)
        log_p = F.log_softmax(logits, dim=1)
        self.centroids = self.centroids.to(log_p)  # device and dtype of the model's outputs
        cmi_q = _kl_to(log_p, self.centroids[y]).mean()
        loss = F.nll_loss(log_p, y) - self.p["lambda"] * cmi_q
        if not self.frozen:
            self._update(log_p.detach().exp(), y)
        return loss

    @torch.no_grad()
    def _update(self, p: torch.Tensor, y: torch.Tensor) -> None:
        self.seen = self.seen.to(p.device)
        present = torch.bincount(y, minlength=self.num_classes) > 0
        means = class_centroids(p, y, self.num_classes)
        m = self.p["momentum"]
        ema = torch.where(self.seen.unsqueeze(1), m * self.centroids + (1 - m) * means, means)
        self.centroids = torch.where(present.unsqueeze(1), ema, self.centroids)
        self.seen |= present


@TEACHER_LOSSES.register("cmic")
class CMIC(TeacherLoss):
    """Yang et al., "Conditional Mutual Information Constrained Deep Learning for
    Classification": minimise CE subject to NCMI <= r, through the Lagrangian

        CE + lambda * CMI_Q - beta * Gamma_Q,

    with the centroids Q as auxiliary variables, by the paper's alternating algorithm:
    (a) theta-step: SGD on that loss with Q fixed for a whole epoch; (b) Q-step (`end_epoch`):
    Q_y <- the mean of the class-y outputs seen during the epoch, the closed-form minimiser of
    E KL(P_X || Q_Y) over Q. A class with no sample in the epoch keeps its centroid.

    CMI_Q = mean_i KL(P_i || Q_{y_i}); Gamma_Q = mean_i sum_{v != y_i} pi_v H(P_i, Q_v), pi_v the
    class frequency in the training split. `begin` sets the initial Q with one no-grad pass over
    the training split in eval mode and computes pi.

    The defaults lambda = 0.1, beta = 0.01 are ours, not the paper's, and are meant to be tuned:
    a list of values in the sweep file trains one teacher per value.
    """

    summary = "CE + lambda*CMI - beta*separation, alternating with centroids (Yang et al.)"
    fidelity = Fidelity(
        "paper-text",
        "Yang et al., 'Conditional Mutual Information Constrained Deep Learning for "
        "Classification' (the paper's text; no code read)",
        (
            "the penalty form CE + lambda*CMI - beta*Gamma (beta = lambda*r) of the constraint "
            "NCMI <= r is our derivation",
            "the Q-step once per epoch, and the defaults lambda = 0.1, beta = 0.01, are ours "
            "(the paper's update frequency and values were not recovered)",
        ),
    )
    params = {
        "lambda": LossParam(0.1, low=0.0, doc="weight of the CMI term (ours, to be tuned)"),
        "beta": LossParam(0.01, low=0.0, doc="weight of the separation term (ours, to be tuned)"),
    }

    def __init__(self, params: dict[str, Any], num_classes: int) -> None:
        super().__init__(params, num_classes)
        self.centroids: torch.Tensor | None = None  # Q, set by begin()
        self.priors: torch.Tensor | None = None  # pi, set by begin()
        self._sums: torch.Tensor | None = None  # per-class sums of the epoch's outputs
        self._counts: torch.Tensor | None = None

    def begin(self, model, x, y, batch_size, augment=None) -> None:
        # un-augmented, eval mode: the paper's initial Q is of the network's outputs as they are
        with eval_mode(model), torch.no_grad():
            probs = torch.cat(
                [
                    F.softmax(model(x[i : i + batch_size]), dim=1)
                    for i in range(0, len(x), batch_size)
                ]
            )
        y = y.to(probs.device)
        self.centroids = class_centroids(probs, y, self.num_classes)
        counts = torch.bincount(y, minlength=self.num_classes).to(probs.dtype)
        self.priors = counts / counts.sum()
        self._reset()

    def _reset(self) -> None:
        assert self.centroids is not None
        self._sums = torch.zeros_like(self.centroids)
        self._counts = torch.zeros(self.num_classes, device=self.centroids.device)

    def loss(self, model, x, y) -> torch.Tensor:
        if self.centroids is None or self.priors is None:
            raise RuntimeError("cmic: call begin() before the first epoch (it sets Q and pi)")
        log_p = F.log_softmax(model(x), dim=1)
        q = self.centroids.to(log_p)
        cmi_q = _kl_to(log_p, q[y]).mean()
        h = log_p.exp() @ -floored_log(q).T  # h[i, v] = H(P_i, Q_v)
        w = self.priors.to(log_p).expand_as(h).scatter(1, y.unsqueeze(1), 0.0)  # pi_v, v != y_i
        gamma_q = (w * h).sum(dim=1).mean()
        with torch.no_grad():
            self._sums.index_add_(0, y.to(self._sums.device), log_p.exp().to(self._sums))
            self._counts += torch.bincount(y, minlength=self.num_classes).to(self._counts)
        return F.nll_loss(log_p, y) + self.p["lambda"] * cmi_q - self.p["beta"] * gamma_q

    def end_epoch(self) -> None:
        if self.centroids is None:
            return
        seen = (self._counts > 0).unsqueeze(1)
        means = self._sums / self._counts.clamp_min(1).unsqueeze(1)
        self.centroids = torch.where(seen, means, self.centroids)
        self._reset()


class _Adversarial(TeacherLoss):
    """Trains on adversarial examples: loss = robust_loss(model, x, perturb(model, x, y), y).

    `eps` defaults to None, meaning the sweep's threat eps, which the caller substitutes before
    construction; `step_size` None means Madry et al.'s 2.5 * eps / steps.
    """

    adversarial = True
    params = {
        "eps": LossParam(None, low=0.0, high=1.0, doc="L-inf radius; None = the sweep's eps"),
        "steps": LossParam(10, low=1, high=MAX_STEPS, integer=True, doc="attack steps"),
        "step_size": LossParam(None, low=0.0, doc="None = 2.5 * eps / steps"),
    }

    def __init__(self, params: dict[str, Any], num_classes: int) -> None:
        super().__init__(params, num_classes)
        if self.p["eps"] is None:
            raise ValueError("eps must be resolved")
        self.eps: float = float(self.p["eps"])
        self.steps: int = self.p["steps"]
        step = self.p["step_size"]
        self.step_size: float = float(step) if step is not None else 2.5 * self.eps / self.steps

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def robust_loss(
        self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model, x, y) -> torch.Tensor:
        return self.robust_loss(model, x, self.perturb(model, x, y), y)


@TEACHER_LOSSES.register("pgd_at")
class PGDAT(_Adversarial):
    """Madry et al. (2018): CE at x', x' = PGD maximising CE from a uniform random start."""

    summary = "PGD adversarial training: CE(model(x'), y) (Madry et al. 2018)"
    fidelity = Fidelity(
        "authors-code",
        "Madry et al., ICLR 2018; MadryLab's cifar10_challenge code (uniform random start, "
        "signed steps, projection onto the ball and [0, 1])",
        (
            "default 10 steps of 2.5*eps/steps (2/255 at 8/255, the protocol TRADES/ARD/RSLAD "
            "share), not cifar10_challenge's 7 steps of 2/255",
        ),
    )

    def perturb(self, model, x, y) -> torch.Tensor:
        return pgd(
            model, x, ce_objective(y), eps=self.eps, steps=self.steps, step_size=self.step_size
        )

    def robust_loss(self, model, x, x_adv, y) -> torch.Tensor:
        return F.cross_entropy(model(x_adv), y)


@TEACHER_LOSSES.register("trades")
class TRADES(_Adversarial):
    """Zhang et al. (2019): CE(model(x), y) + beta * KL(p(x) || p(x')), batchmean KL.

    x' maximises KL(p(x) || p(x')) with p(x) fixed, from x + 0.001 * N(0, 1), by signed-gradient
    steps projected onto the eps-ball and [0, 1], in eval mode (as the authors' code). In the
    training loss the gradient flows through both p(x) and p(x'), also as theirs.
    """

    summary = "TRADES: CE(x) + beta*KL(p(x) || p(x')) (Zhang et al. 2019)"
    fidelity = Fidelity(
        "authors-code",
        "Zhang et al., ICML 2019; the authors' code github.com/yaodongyu/TRADES (trades.py)",
        (
            "default step size 2.5*eps/steps (2/255 at 8/255, 10 steps); TRADES's CIFAR script "
            "uses 0.007: set step_size: 0.007 to match it",
        ),
    )
    params = {"beta": LossParam(6.0, low=0.0, doc="weight of the robust KL"), **_Adversarial.params}

    def perturb(self, model, x, y) -> torch.Tensor:
        x = x.detach()
        with eval_mode(model), torch.no_grad():
            target = model(x)
        return pgd(
            model,
            x,
            kl_objective(target),
            eps=self.eps,
            steps=self.steps,
            step_size=self.step_size,
            start=x + 0.001 * torch.randn_like(x),
        )

    def robust_loss(self, model, x, x_adv, y) -> torch.Tensor:
        return trades_loss(model(x), model(x_adv), y, self.p["beta"])
