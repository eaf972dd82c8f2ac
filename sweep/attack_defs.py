"""The training attacks' settings in the sweep file, one entry per attack, and their resolution
into configured `sweep.training.TrainAttack`s.

Why per attack: the grid's `train_attack` axis compares attacks that differ in their step size
by design (FGSM steps eps, FGSM-RS 1.25 * eps, PGD eps/4, MI-FGSM eps/steps). One step size for
every attack would replace FGSM's eps and FGSM-RS's 1.25 * eps by PGD's, and the cells would no
longer be the attacks their names say. So each attack keeps its paper's training protocol
(`sweep.attacks.AttackInfo.train_steps` / `train_step`) unless the file sets it for that attack:

    train_attack:
      eps: null                       # default: threat.eps
      pgd: {steps: 10, step_size: 0.00784}
      mifgsm: {steps: 10, params: {decay: 1.0}}

Defaults (DESIGN §4.1): PGD and CW-inf 10 steps of eps/4 (2/255 at 8/255, the protocol of ARD,
IAD, RSLAD, MTARD; TRADES's 0.007); FGSM one step of eps; FGSM-RS one step of 1.25 * eps from a
uniform start (Wong et al. 2020); MI-FGSM 10 steps of eps/steps, decay 1.0 (Dong et al. 2018).
The evaluation attacks (`evaluation.attacks`) are configured elsewhere and keep the attack
functions' own defaults (PGD 2.5 * eps / steps).

cw_inf's `kappa` cannot be set here: as a training attack cw_inf climbs the method's own inner
objective (CE for ce/pgd_at/ARD, a KL for TRADES/RSLAD), not the CW margin, so kappa would be
silently ignored; with its default protocol it is then the same attack as pgd.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, model_serializer, model_validator

from .attacks import ATTACKS, param_problem
from .space import MAX_STEPS, StrictModel
from .training import TrainAttack

_EXAMPLE = "train_attack: {pgd: {steps: 10, step_size: 0.00784}, mifgsm: {params: {decay: 1.0}}}"


class AttackSettings(StrictModel):
    """What the file may set for one training attack; None keeps the attack's training default."""

    steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="iterative attacks only")
    step_size: float | None = Field(None, gt=0, le=1, description="default: the attack's rule")
    # checked against the attack's declaration (attacks.param_problem), which rejects booleans
    params: dict[str, Any] = Field(default_factory=dict)


class TrainAttackSpec(StrictModel):
    """`train_attack:` of the sweep file: `eps` and one optional entry per registered attack.

    The YAML form is flat (`pgd: {...}` beside `eps`); it is held as `attacks` and written back
    flat (`model_dump`), so a dumped sweep parses to the same spec.
    """

    eps: float | None = Field(None, ge=0, le=1, description="default: threat.eps")
    attacks: dict[str, AttackSettings] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        """Overrides StrictModel's check: the keys besides eps are attack names, not fields."""
        if not isinstance(data, dict):
            return data
        _reject_one_step_for_all(data)
        attacks = {k: v for k, v in data.items() if k != "eps"}
        return {**({"eps": data["eps"]} if "eps" in data else {}), "attacks": _settings(attacks)}

    @model_serializer(mode="plain")
    def _flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {"eps": self.eps}
        for name, s in self.attacks.items():
            out[name] = s.model_dump(exclude_defaults=True)
        return out

    def settings(self, name: str) -> AttackSettings:
        return self.attacks.get(name, AttackSettings())

    def resolve(self, name: str, threat_eps: float, norm: str) -> TrainAttack:
        """The fully configured training attack `name`: eps (this file's, else the threat's),
        steps and step size (set here for this attack, else its training protocol; the step a
        number, never None), norm and params (declared defaults filled in, sorted)."""
        info = ATTACKS.get(name)
        s = self.settings(name)
        eps = self.eps if self.eps is not None else threat_eps
        if info.train_step is None:  # `none`: no step to take
            return TrainAttack(name, eps, 0, 0.0, norm)
        steps = (s.steps or info.train_steps or 1) if info.iterative else 1
        step = s.step_size if s.step_size is not None else info.train_step(eps, steps)
        params = {k: p.default for k, p in info.params.items() if p.training}
        params |= {k: float(v) for k, v in s.params.items()}
        return TrainAttack(name, eps, steps, step, norm, tuple(sorted(params.items())))

    def protocol(self, names: list[str], threat_eps: float, norm: str) -> list[dict[str, Any]]:
        """One row per grid attack (name, eps, steps, step_size, rule, params): what `sweep
        validate` prints and a run logs, so every number is read beside its training attack."""
        rows = []
        for name in names:
            a = self.resolve(name, threat_eps, norm)
            info = ATTACKS.get(name)
            own = self.settings(name).step_size is not None
            rule = "set" if own else (info.train_step.describe() if info.train_step else "-")
            rows.append(
                {
                    "name": name,
                    "eps": a.eps,
                    "steps": a.steps,
                    "step_size": a.step_size,
                    "step_rule": rule,
                    "params": dict(a.params),
                }
            )
        return rows


def _reject_one_step_for_all(data: dict[str, Any]) -> None:
    """The old form (one top-level steps/step_size for every attack) is an error, not a
    silent default: it used to override FGSM's eps and FGSM-RS's 1.25 * eps."""
    old = [k for k in ("steps", "step_size") if k in data]
    if old:
        raise ValueError(
            f"{old[0]}: a top-level {'/'.join(old)} would apply to every training attack "
            "(FGSM's step of eps and FGSM-RS's 1.25*eps included); set it per attack, e.g. "
            + _EXAMPLE
        )


def _settings(attacks: dict[str, Any]) -> dict[str, AttackSettings]:
    """Each entry validated against its attack's declaration; errors name `<attack>.<field>`."""
    out = {}
    for name, raw in attacks.items():
        if name not in ATTACKS:
            raise ValueError(
                f"{name}: not a training attack; keys are eps or one of: {', '.join(ATTACKS)}"
            )
        try:
            s = AttackSettings.model_validate({} if raw is None else raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            msg = str(first["msg"]).removeprefix("Value error, ")
            if first["type"] != "value_error" and "input" in first:
                msg += f" (got {first['input']!r})"
            raise ValueError(f"{name}{'.' + where if where else ''}: {msg}") from None
        _check_against(name, s)
        out[name] = s
    return out


def _check_against(name: str, s: AttackSettings) -> None:
    info = ATTACKS.get(name)
    if info.train_step is None and (s.steps or s.step_size or s.params):
        raise ValueError(f"{name}: takes no settings (it trains on clean inputs)")
    if s.steps is not None and not info.iterative:
        raise ValueError(f"{name}.steps: {name} takes one step; set step_size instead")
    for key, value in s.params.items():
        problem = param_problem(name, key, value, training=True)
        if problem:
            raise ValueError(f"{name}.params.{key}: {problem}")
