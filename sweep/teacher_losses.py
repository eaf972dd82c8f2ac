"""Teacher losses (DESIGN.md §4, the first grid axis), behind one registry.

Why classes rather than functions of (logits, labels): some losses keep state across batches
(`mcmi`'s running centroids, `cmic`'s per-epoch centroids), need the whole training split before
the first epoch (`cmic`'s initial centroids and class priors), or run the model themselves on
inputs other than the batch (`pgd_at`, `trades`). One instance trains one teacher.

Adding a loss: a TeacherLoss subclass here, decorated with `@TEACHER_LOSSES.register("<name>")`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import ce_objective, eval_mode, kl_objective, pgd
from .cmi import class_centroids, floored_log
from .losses import trades_loss
from .registry import Registry


@dataclass(frozen=True)
class LossParam:
    """A teacher-loss parameter: its default, bounds (None = unbounded; `low` inclusive, `high`
    inclusive unless `high_open`), integrality."""

    default: float | int | None
    low: float | None = None
    high: float | None = None
    integer: bool = False
    doc: str = ""
    high_open: bool = False  # [low, high): a smoothing or a momentum of 1 is meaningless

    def check(self, value: Any) -> str | None:
        """None if `value` is acceptable, else why not (for the sweep file's error message)."""
        if value is None:
            return None if self.default is None else "must be set (got None)"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be {'an integer' if self.integer else 'a number'} (got {value!r})"
        if self.integer and not isinstance(value, int):
            return "must be an integer"
        if math.isnan(value):
            return "must be a number (got nan)"
        if self.low is not None and value < self.low:
            return f"must be >= {self.low} (got {value})"
        if self.high is not None and self.high_open and value >= self.high:
            return f"must be < {self.high} (got {value})"
        if self.high is not None and value > self.high:
            return f"must be <= {self.high} (got {value})"
        return None


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

    def begin(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        """Before the first epoch, with the whole training split."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def end_epoch(self) -> None:
        """After the last batch of each epoch."""

    @classmethod
    def describe(cls) -> dict[str, Any]:
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
                for k, p in cls.params.items()
            },
        }


TEACHER_LOSSES: Registry[type[TeacherLoss]] = Registry("teacher loss")


@TEACHER_LOSSES.register("ce")
class CrossEntropy(TeacherLoss):
    summary = "cross-entropy (maximum likelihood)"

    def loss(self, model, x, y) -> torch.Tensor:
        return F.cross_entropy(model(x), y)


@TEACHER_LOSSES.register("mse")
class MSE(TeacherLoss):
    """Hamidi et al. (ECCV 2024): squared error between the softmax probabilities and the one-hot
    label, summed over classes and averaged over the batch (the Brier score). On probabilities,
    not logits: the authors' released code trains with CE here by mistake."""

    summary = "MSE between softmax probabilities and one-hot labels (Hamidi et al. 2024)"

    def loss(self, model, x, y) -> torch.Tensor:
        p = F.softmax(model(x), dim=1)
        onehot = F.one_hot(y, num_classes=p.shape[1]).to(p.dtype)
        return (p - onehot).pow(2).sum(dim=1).mean()


@TEACHER_LOSSES.register("label_smoothing")
class LabelSmoothing(TeacherLoss):
    """CE against (1 - s) * onehot + s / C, i.e. (1 - s) * CE + s * mean_k(-log p_k)."""

    summary = "cross-entropy against smoothed labels (1-s)*onehot + s/C"
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

    CMI_Q = mean_i KL(P_i || Q_{y_i}) with Q running class centroids: detached (no gradient goes
    through them) and updated after each batch as an EMA of the batch's class means. A batch's
    loss uses Q as it was before that batch's update. A class's first update sets its centroid to
    its batch mean; until then it is uniform.
    """

    summary = "CE - lambda*CMI to running class centroids (Ye et al. 2024)"
    params = {
        "lambda": LossParam(0.1, low=0.0, doc="weight of the CMI term"),
        "momentum": LossParam(
            0.9, low=0.0, high=1.0, high_open=True, doc="EMA momentum of the centroids"
        ),
    }

    def __init__(self, params: dict[str, Any], num_classes: int) -> None:
        super().__init__(params, num_classes)
        self.centroids = torch.full((num_classes, num_classes), 1.0 / num_classes)
        self.seen = torch.zeros(num_classes, dtype=torch.bool)

    def loss(self, model, x, y) -> torch.Tensor:
        logits = model(x)
        log_p = F.log_softmax(logits, dim=1)
        self.centroids = self.centroids.to(log_p)  # device and dtype of the model's outputs
        self.seen = self.seen.to(log_p.device)
        cmi_q = _kl_to(log_p, self.centroids[y]).mean()
        loss = F.nll_loss(log_p, y) - self.p["lambda"] * cmi_q
        self._update(log_p.detach().exp(), y)
        return loss

    @torch.no_grad()
    def _update(self, p: torch.Tensor, y: torch.Tensor) -> None:
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

    def begin(self, model, x, y, batch_size) -> None:
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
        "steps": LossParam(10, low=1, integer=True, doc="attack steps"),
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
