"""`mtard` (Zhao, Yu, Sun, Zhang & Wei, ECCV 2022, "Enhanced Accuracy and Robustness via
Multi-Teacher Adversarial Distillation").

Two teachers, each for the inputs it is good at: a clean (standard) teacher guides the student on
clean x, a robust (adversarially trained) teacher on the adversarial x':

    L = w_nat * T^2 * KL(T_clean(x)^T || S(x)^T) + w_adv * T^2 * KL(T_rob(x')^T || S(x')^T)

x' maximises the student's cross-entropy (the paper's inner max; the authors' code,
`mtard_inner_loss_ce`, runs PGD on CE(S(x'), y), not on a KL against the robust teacher).

Adaptive Normalization Loss: neither teacher may dominate, so the weights follow the student's
*relative* learning progress toward each. With L^0 each term's loss on the first training batch,

    l_nat = L_nat / L_nat^0,   l_adv = L_adv / L_adv^0          (progress: 1 at the start)
    r_nat = l_nat^b / (l_nat^b + l_adv^b)                          (b = 1 in the authors' code)
    w_nat <- w_nat - eta * (w_nat - r_nat),   w_adv = 1 - w_nat,   w_nat = w_adv = 1/2 at start

every step, before the step's loss is formed (the updated weights weight this batch's terms, as
in the code). The term the student has learned *less* of (larger normalised loss) gains weight.
eta is `weight_lr` (0.025 in the code), divided by 10 when the authors divide the learning rate:
after epochs 215, 260 and 285 of 300, here at the same fractions of the run.

Deviations, and why:
- Temperature: the paper and code use none (T = 1, the bottom of the range); here both terms
  share a searchable T with Hinton's T^2 so the gradient scale does not move with T (DESIGN
  §3.5). T^2 cancels in the normalised losses, so the weight rule is unchanged by it.
- KL is batchmean. The code averages over batch *and* classes (a 1/C loss scale; it cancels in
  the weight rule too) and computes log(p + 1e-5), which we do not copy.
- The weights are constants in the loss (the code updates them from `.item()` values): the rule
  is a schedule, not something the student's gradient acts on. Here they are updated on the
  device in float64 (the same arithmetic as Python floats), so a GPU step never waits for its
  losses to reach the host; they are read back only for a checkpoint.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch

from ..fidelity import Fidelity
from ..losses import soft_kl
from ..space import Domain, FloatParam, LogFloatParam
from .base import METHODS, POSITIVE_TEMPERATURE, Method

EXPONENT = 1.0  # b in the rule above ("bert" in the authors' code)
# fractions of the run after which weight_lr is divided by 10 (215, 260, 285 of 300 epochs)
DECAY_AT = (215 / 300, 260 / 300, 285 / 300)
TINY = 1e-12  # guards the normalisation when a first-batch loss is exactly 0
Num = TypeVar("Num", float, torch.Tensor)


def adaptive_weight(
    w_nat: Num, lhat_nat: Num, lhat_adv: Num, lr: float, exponent: float = EXPONENT
) -> Num:
    """One step of the Adaptive Normalization Loss rule; returns the new w_nat (w_adv = 1 - w).
    Floats or tensors alike."""
    a, b = lhat_nat**exponent, lhat_adv**exponent
    return w_nat - lr * (w_nat - a / (a + b))


@METHODS.register("mtard")
class MTARD(Method):
    summary = "MTARD: w_nat*KL(T_clean(x)||S(x)) + w_adv*KL(T_rob(x')||S(x')), adaptive w"
    teacher_set = "clean+robust"
    needs_attack = True
    inner_max = "student cross-entropy"
    # the code's setting, T = 1 and weight_lr = 0.025, lies inside both ranges
    space = {
        "temperature": FloatParam(low=1.0, high=10.0),
        "weight_lr": LogFloatParam(low=0.005, high=0.5),
    }
    domain = {
        "temperature": POSITIVE_TEMPERATURE,
        "weight_lr": Domain(low=0.0, low_open=True, doc="a learning rate"),
    }
    paper_default = {"temperature": 1.0, "weight_lr": 0.025}
    fidelity = Fidelity(
        "authors-code",
        "Zhao et al., ECCV 2022, Enhanced Accuracy and Robustness via Multi-Teacher Adversarial "
        "Distillation; github.com/zhaoshiji123/MTARD (mtard/mtard_loss.py, "
        "mtard/mtard_resnet18_cifar10.py, commit a46fbc2)",
        (
            "The temperature is ours (searched, with Hinton's T^2); the paper and code use none, "
            "which is T = 1, the paper_default.",
            "Their KLs average over the classes as well as the batch and take log(p + 1e-5); ours "
            "is an exact batchmean KL, C times theirs (the weight rule is unchanged by it).",
            "weight_lr is divided by 10 at the same fractions of the run as their epochs 215, 260 "
            "and 285 of 300, so the two agree only on a 300-epoch run.",
            "Their inner maximisation starts at x + 0.001 N(0, 1); ours starts as the cell's "
            "train_attack does (PGD: uniform in the eps-ball).",
        ),
    )

    def __init__(self, hp: dict[str, Any]) -> None:
        super().__init__(hp)
        self._w: float | torch.Tensor = 0.5  # w_nat; a float64 tensor on the device once updated
        self._init: torch.Tensor | None = None  # first-batch (L_nat, L_adv), float64
        self.lr = float(hp["weight_lr"])

    # read back to the host: for checkpoints and inspection, never on the training step
    @property
    def w_nat(self) -> float:
        return float(self._w)

    @property
    def w_adv(self) -> float:
        return 1.0 - self.w_nat

    @property
    def init_nat(self) -> float | None:
        return None if self._init is None else float(self._init[0])

    @property
    def init_adv(self) -> float | None:
        return None if self._init is None else float(self._init[1])

    def start_epoch(self, epoch: int, epochs: int) -> None:
        decays = sum(epoch > f * epochs for f in DECAY_AT)
        self.lr = float(self.hp["weight_lr"]) * 0.1**decays

    def update_weights(self, losses: torch.Tensor) -> torch.Tensor:
        """Record the first losses (L_nat, L_adv), then move w_nat toward the relative
        progress; all on the losses' device. Returns w_nat (a 0-dim float64 tensor)."""
        losses = losses.detach().to(torch.float64)
        if self._init is None:
            self._init = losses.clone()
        elif self._init.device != losses.device:  # loaded from a checkpoint
            self._init = self._init.to(losses.device)
        lhat = losses / self._init.clamp_min(TINY)
        w = torch.as_tensor(self._w, dtype=torch.float64, device=losses.device)
        moved = adaptive_weight(w, lhat[0], lhat[1], self.lr)
        self._w = torch.where(lhat.sum() > 0, moved, w)  # both terms exactly 0: nothing to balance
        return self._w

    def loss(self, student, teachers, x, x_adv, y) -> torch.Tensor:
        t = self.hp["temperature"]
        clean, robust = teachers
        kl_nat = t * t * soft_kl(student(x), self.teacher_logits(clean, x), t)
        kl_adv = t * t * soft_kl(student(x_adv), self.teacher_logits(robust, x_adv), t)
        w = self.update_weights(torch.stack([kl_nat, kl_adv]))
        return w.to(kl_nat.dtype) * kl_nat + (1 - w).to(kl_adv.dtype) * kl_adv

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"w_nat": self.w_nat, "w_adv": self.w_adv}
        if self.init_nat is not None and self.init_adv is not None:
            state["init_nat"], state["init_adv"] = self.init_nat, self.init_adv
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._w = float(state.get("w_nat", 0.5))
        init_nat, init_adv = state.get("init_nat"), state.get("init_adv")
        self._init = None
        if init_nat is not None and init_adv is not None:
            self._init = torch.tensor([float(init_nat), float(init_adv)], dtype=torch.float64)
