"""Clean and robust accuracy, and sanity checks on the numbers.

Robust accuracy counts every example: one misclassified when clean counts as not robust, and
with restarts an example is robust only if it survives every restart (DESIGN §3.4). Each attack
maximises its own evaluation objective (cross-entropy for PGD, the CW margin for cw_inf).

`evaluation.attacks` in a sweep file names attacks of two registries: the training attacks
(`sweep.attacks.ATTACKS`, run here by `accuracy`) and the evaluation-only ones of `EVAL_ATTACKS`
below (AutoAttack), each of which computes its own metrics.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attacks import ATTACKS, attack_view, eval_mode, run_attack
from .autoattack import NORMS as AUTOATTACK_NORMS
from .autoattack import VERSIONS as AUTOATTACK_VERSIONS
from .autoattack import autoattack_eval
from .registry import Registry


@dataclass(frozen=True)
class EvalAttackInfo:
    """An evaluation-only attack: allowed in `evaluation.attacks`, never as a training attack
    nor as the per-epoch `evaluation.val_attack` (far too slow for either).

    `evaluate(model, x, y, run, *, eps, norm, batch_size, prefix, state_dir, flags)` returns its
    metrics (`{prefix}/robust_acc/{run.key}`, ...) for one AttackRun `run`. `options`: the
    AttackRun fields it reads and what each means for it (`sweep list` adds their defaults).
    `variants`: the names a sweep file may give for it, each standing for option values
    (`autoattack_apgd` = {name: autoattack, version: apgd}); a run's metric key starts with the
    name of the variant it matches.
    """

    name: str
    evaluate: Callable[..., dict[str, float]]
    summary: str
    norms: tuple[str, ...]
    options: Mapping[str, str]
    variants: Mapping[str, Mapping[str, Any]]

    def variant(self, run: Any) -> str:
        """The variant name `run` (an AttackRun of this attack) matches."""
        for name, values in self.variants.items():
            if all(getattr(run, k) == v for k, v in values.items()):
                return name
        return self.name


EVAL_ATTACKS: Registry[EvalAttackInfo] = Registry("evaluation attack", entry=EvalAttackInfo)


def evaluation_attack_names() -> list[str]:
    """Every attack name `evaluation.attacks` accepts, sorted: the training attacks but `none`,
    and the evaluation-only ones."""
    return sorted([n for n in ATTACKS.names() if n != "none"] + EVAL_ATTACKS.names())


def _threat(attack: Any, eps: float, norm: str) -> tuple[float, str]:
    """An attack run's eps and norm: its own where it sets them, else the sweep's threat's."""
    return (attack.eps if attack.eps is not None else eps), (attack.norm or norm)


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y


def robust_mask(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Any,
    *,
    eps: float,
    norm: str = "linf",
    clean: torch.Tensor | None = None,
    surrogate: nn.Module | None = None,
) -> torch.Tensor:
    """Per example: correct on the clean input and on every restart's adversarial example.
    Later restarts attack only the examples still standing. `clean`: the clean-correct mask,
    when the caller already has it (saves a forward pass). `surrogate`: the model whose input
    gradients drive the attack, the same function as `model` (see `attack_view`); the verdict
    is always `model`'s."""
    make_objective = ATTACKS.get(attack.name).objective
    eps, norm = _threat(attack, eps, norm)
    ok = clean.clone() if clean is not None else _correct(model, x, y)
    for _ in range(attack.restarts):
        idx = ok.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        x_adv = run_attack(
            attack.name,
            surrogate if surrogate is not None else model,
            x[idx],
            make_objective(y[idx]),
            eps=eps,
            steps=attack.steps,
            step_size=attack.step_size,
            norm=norm,
        )
        ok[idx] = _correct(model, x_adv, y[idx])
    return ok


def accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: Any | None = None,
    eps: float = 0.0,
    norm: str = "linf",
    batch_size: int = 256,
    clean: torch.Tensor | None = None,
    surrogate: nn.Module | None = None,
) -> float:
    """Accuracy on (x, y); robust accuracy under `attack` (an AttackRun) when given. `clean`:
    the clean-correct mask of (x, y) if already known (see `clean_mask`). The attack's
    gradients come from `surrogate`, by default `attack_view(model)`, made once here."""
    correct = 0
    if attack is not None and surrogate is None:
        surrogate = attack_view(model)
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            cb = clean[i : i + batch_size] if clean is not None else None
            if attack is None:
                correct += int((cb if cb is not None else _correct(model, xb, yb)).sum())
            else:
                mask = robust_mask(
                    model, xb, yb, attack, eps=eps, norm=norm, clean=cb, surrogate=surrogate
                )
                correct += int(mask.sum())
    return correct / max(len(x), 1)


def clean_mask(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Per example: classified correctly without attack (in eval mode)."""
    with eval_mode(model):
        return torch.cat(
            [
                _correct(model, x[i : i + batch_size], y[i : i + batch_size])
                for i in range(0, len(x), batch_size)
            ]
        )


@EVAL_ATTACKS.register(
    "autoattack",
    summary="AutoAttack (Croce & Hein 2020, pyautoattack) on the first `examples` test examples, "
    "checked against PGD-20 on the same ones",
    norms=tuple(AUTOATTACK_NORMS),
    options={
        "version": "; ".join(f"{v}: {', '.join(a)}" for v, a in AUTOATTACK_VERSIONS.items()),
        "examples": "the first N test examples (it is expensive); null = all",
        "eps": "its radius; null = threat.eps",
        "norm": "linf or l2; null = threat.norm",
    },
    variants={"autoattack": {"version": "standard"}, "autoattack_apgd": {"version": "apgd"}},
)
def autoattack_metrics(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Any,
    *,
    eps: float,
    norm: str = "linf",
    batch_size: int = 256,
    prefix: str = "test",
    state_dir: Path | None = None,
    flags: list[str] | None = None,
) -> dict[str, float]:
    """AutoAttack on the first `attack.examples` examples, and PGD-20 on the same ones: AutoAttack
    finding fewer adversarial examples than PGD-20 means something is wrong (flagged)."""
    n = min(attack.examples or len(x), len(x))
    a_eps, a_norm = _threat(attack, eps, norm)
    state = state_dir / f"{attack.key}.pt" if state_dir is not None else None
    with eval_mode(model):
        result = autoattack_eval(
            model,
            x[:n],
            y[:n],
            eps=a_eps,
            norm=a_norm,
            version=attack.version,
            batch_size=batch_size,
            state_file=state,
        )
        pgd20 = type(attack).model_validate({"name": "pgd", "steps": 20, "eps": a_eps})
        clean = result.clean_correct.to(y.device)
        pgd = robust_mask(
            model,
            x[:n],
            y[:n],
            pgd20,
            eps=a_eps,
            norm=a_norm,
            clean=clean,
            surrogate=attack_view(model),
        )
        pgd_robust = int(pgd.sum())
    if flags is not None:
        flags.extend(f"{attack.key}: {f}" for f in result.flags)
        if int(result.robust.sum()) > pgd_robust:
            flags.append(
                f"{attack.key}: robust on {int(result.robust.sum())} of {n} examples, more than "
                f"PGD-20's {pgd_robust}: AutoAttack should never be weaker"
            )
    return {
        f"{prefix}/robust_acc/{attack.key}": result.robust_acc,
        f"{prefix}/examples/{attack.key}": float(n),
    }


def evaluate_suite(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[Any],
    *,
    eps: float,
    norm: str = "linf",
    batch_size: int = 256,
    prefix: str = "test",
    state_dir: Path | None = None,
    flags: list[str] | None = None,
) -> dict[str, float]:
    """`{prefix}/clean_acc` and `{prefix}/robust_acc/<attack key>` for each attack. An
    evaluation-only attack (EVAL_ATTACKS: AutoAttack) adds its own metrics, resumes from
    `state_dir` when given and appends its checks' warnings to `flags`."""
    clean = clean_mask(model, x, y, batch_size)
    out = {f"{prefix}/clean_acc": int(clean.sum()) / max(len(x), 1)}  # as `accuracy` counts
    plain = [a for a in attacks if a.name not in EVAL_ATTACKS]
    surrogate = attack_view(model) if plain else None  # folded once for every attack below
    for a in attacks:
        if a.name in EVAL_ATTACKS:
            out |= EVAL_ATTACKS.get(a.name).evaluate(
                model,
                x,
                y,
                a,
                eps=eps,
                norm=norm,
                batch_size=batch_size,
                prefix=prefix,
                state_dir=state_dir,
                flags=flags,
            )
            continue
        out[f"{prefix}/robust_acc/{a.key}"] = accuracy(
            model,
            x,
            y,
            attack=a,
            eps=eps,
            norm=norm,
            batch_size=batch_size,
            clean=clean,
            surrogate=surrogate,
        )
    return out


def sanity_warnings(
    metrics: dict[str, float], attacks: Sequence[Any], *, eps: float, prefix: str = "test"
) -> list[str]:
    """Numbers that should not happen with a sound attack and evaluation:
    - robust accuracy above clean accuracy;
    - robust accuracy that rises as eps grows (same attack, several eps);
    - an attack at eps > 0 that changed no prediction of a model that is not perfect
      (typical of gradient masking, or an attack started at a point of zero gradient)."""
    out: list[str] = []
    clean = metrics.get(f"{prefix}/clean_acc")
    by_kind: dict[tuple, list[tuple[float, str, float]]] = defaultdict(list)
    for a in attacks:
        key = f"{prefix}/robust_acc/{a.key}"
        if key not in metrics or clean is None:
            continue
        value, a_eps = metrics[key], a.eps if a.eps is not None else eps
        if a.name in EVAL_ATTACKS:
            continue  # on its own subset of examples, with checks of its own (AutoAttack's)
        if value > clean + 1e-9:
            out.append(f"{a.key}: robust accuracy {value:.4f} is above clean {clean:.4f}")
        if a_eps > 0 and 0 < clean < 1 and abs(value - clean) < 1e-12:
            out.append(f"{a.key}: changed no prediction at eps {a_eps:g} (gradient masking?)")
        by_kind[(a.name, a.steps, a.norm, a.restarts)].append((a_eps, a.key, value))
    for runs in by_kind.values():
        runs.sort()
        for (e1, k1, v1), (e2, k2, v2) in zip(runs, runs[1:], strict=False):
            if e2 > e1 and v2 > v1 + 1e-9:
                out.append(f"{k2}: robust accuracy {v2:.4f} at eps {e2:g} is above {k1}'s {v1:.4f}")
    return out
