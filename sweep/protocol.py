"""The experimental protocol a sweep file implies, in words a paper's methods section uses.

Why a module of its own: a robust accuracy is comparable with a published one only under the same
protocol (DESIGN §4.1): how many images were trained on, how the crops were padded, how many
attack steps of which size trained and evaluated the network, in which precision. These are
scattered over the file's defaults and the attacks' declarations; here they are resolved once,
for `sweep validate` to print and for every run to log (params `protocol/...`), so a number read
in MLflow months later still says how it was made.
"""

from __future__ import annotations

from .attacks import ATTACKS
from .data import DATASETS, split_sizes
from .spec import AttackRun, SweepSpec


def _optim(o: object, epochs: int) -> str:
    d = o.model_dump()  # type: ignore[attr-defined]
    mom = ""
    if d["optimizer"] == "sgd":
        mom = f" {'nesterov ' if d.get('nesterov') else ''}momentum {d['momentum']:g}"
    return (
        f"{d['optimizer']} lr {d['lr']:g}{mom} weight decay {d['weight_decay']:g}, batch "
        f"{d['batch_size']}, {d['schedule']} schedule, {epochs} epochs"
    )


def eval_attack(run: AttackRun, eps: float, norm: str) -> str:
    """`pgd20: 20 steps of 0.00157 (2.5*eps/steps), eps 0.0314 linf`, the step resolved as the
    attack resolves it when the file sets none."""
    e = run.eps if run.eps is not None else eps
    n = run.norm or norm
    if run.evaluation_only:
        return f"{run.key}: eps {e:.4g} {n}" + (
            f", first {run.examples} examples" if run.examples else ""
        )
    info = ATTACKS.get(run.name)
    steps = run.steps if info.iterative else 1
    if run.step_size is not None:
        step, rule = run.step_size, "set"
    elif info.eval_step is not None:
        step, rule = info.eval_step(e, steps), info.eval_step.describe()
    else:
        step, rule = 0.0, "-"
    restarts = f", {run.restarts} restarts" if run.restarts > 1 else ""
    return f"{run.key}: {steps} x {step:.4g} ({rule}), eps {e:.4g} {n}{restarts}"


def protocol(spec: SweepSpec) -> dict[str, str]:
    """Each part of the protocol in one line, keyed by a short name (a run's `protocol/<key>`)."""
    d = spec.dataset
    info = DATASETS.get(d.name)
    sizes = split_sizes(info, d.val_fraction, d.test_fraction)
    test = f", test {sizes['test']} (carved)" if "test" in sizes else ", the official test split"
    out = {
        "data": f"{d.name}: train {sizes['train']}, validation {sizes['val']}{test}",
    }
    if spec.refit:
        out["refit"] = (
            f"each cell's best retrained on train + validation ({sizes['train'] + sizes['val']})"
        )
    crop = f"random crop, zero padding {info.crop_pad}" if d.augment else "none"
    flip = " + horizontal flip" if d.augment and info.flip else ""
    strong = f" + {d.strong_augment}" if d.strong_augment != "none" else ""
    out["augmentation"] = crop + flip + strong
    out["student_optim"] = _optim(spec.student.optim, spec.budget.epochs)
    teachers = spec.all_teachers()
    if teachers and all(t.source == "checkpoint" for t in teachers):
        out["teacher_optim"] = "none trained: every teacher is loaded from a checkpoint"
    elif teachers:
        out["teacher_optim"] = _optim(spec.teacher.optim, spec.teacher.epochs) + (
            "; fine-tuned teachers: their own (the plan's teacher lines)"
            if any(t.source == "finetuned" for t in teachers)
            else ""
        )
    rows = spec.train_attack.protocol(spec.grid.train_attack, spec.threat.eps, spec.threat.norm)
    for r in rows:
        params = ", ".join(f"{k} {v:g}" for k, v in r["params"].items())
        out[f"train_attack/{r['name']}"] = (
            f"{r['steps']} x {r['step_size']:.4g} ({r['step_rule']}), eps {r['eps']:.4g} "
            f"{spec.threat.norm}" + (f", {params}" if params else "")
        )
    ev = spec.evaluation
    val_n = f"first {ev.val_examples}" if ev.val_examples else "all"
    out["validation"] = (
        f"clean + {eval_attack(ev.val_attack, spec.threat.eps, spec.threat.norm)} on {val_n} "
        "validation examples, every epoch"
    )
    test_n = f"first {ev.test_examples}" if ev.test_examples else "all"
    out["test"] = f"clean + {len(ev.attacks)} attacks on {test_n} test examples, once"
    for a in ev.attacks:
        out[f"test/{a.key}"] = eval_attack(a, spec.threat.eps, spec.threat.norm)
    c = spec.compute
    auto = (
        " (bf16 autocast and channels_last on CUDA, fp32 on a CPU)" if c.precision == "auto" else ""
    )
    out["precision"] = f"{c.precision}{auto}, evaluation in fp32"
    return out


def protocol_lines(spec: SweepSpec) -> list[str]:
    """What `sweep validate` prints under `protocol:`."""
    p = protocol(spec)
    width = max(map(len, p))
    return ["protocol:"] + [f"  {k:<{width}}  {v}" for k, v in p.items()]
