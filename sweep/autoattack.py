"""AutoAttack (Croce & Hein 2020) behind our conventions, with a resume of our own.

Why an adaptor and not `pyautoattack` called directly: the package's reference code assumes a
caller that owns the process. It never puts the model in eval() (batch norm would use batch
statistics), reseeds the global torch RNG in every attack (a trial's own random stream would be
changed by evaluating), accumulates parameter gradients in FAB (`y.backward`), reports its sanity
checks (randomized defense, probability outputs, zero gradients, ...) only as WARNING records on
the `auto-attack` logger, and its `state_path` resume is broken in 0.2.0. Here the model is
evaluated in eval() with its parameters frozen and every mode, parameter, buffer and gradient left
as it was, the RNG is forked, the checks come back as `AutoAttackResult.flags`, and an
interrupted evaluation resumes chunk by chunk from `state_file`.

Robust accuracy follows `sweep.evaluate`: every example counts, and one misclassified when clean
is never robust (AutoAttack agrees: it leaves a clean mistake's predicted label in `y_adv`).
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attacks import eval_mode
from .files import atomic_write

AA_LOGGER = "auto-attack"
NORMS = {"linf": "Linf", "l2": "L2"}
# "standard": the published suite (APGD-CE, APGD-T, FAB-T, Square 5000 queries; one restart each).
# "apgd": its two gradient attacks only, each with one restart: the cheap subset that finds
# almost every adversarial example the full suite finds on a model without gradient masking.
VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "apgd": ("apgd-ce", "apgd-t"),
}
# AutoAttack's default number of target classes for APGD-T and FAB-T
MAX_TARGETS = 9
# The targeted DLR loss of APGD-T reads the 3rd and 4th largest logits: it needs 4 classes.
MIN_CLASSES_APGD_T = 4
# Distances are float32 arithmetic on [0, 1] data; anything further out is a real violation.
_BALL_TOL = 1e-5
_STATE_FORMAT = 1
_PERTURBED = re.compile(r"^(\S+) - \d+/\d+ - (\d+) out of \d+ successfully perturbed$")


@dataclass
class AutoAttackResult:
    """The outcome of `autoattack_eval` on N examples (tensors on the CPU).

    `robust`: correct on the clean input and on AutoAttack's adversarial example. `clean_correct`:
    correct on the clean input (our own pass, in eval()). `per_attack_acc`: AutoAttack's own
    running robust accuracy over all N examples, `clean` first and then after each attack in the
    order run, so the last value is `robust.mean()` (up to a near-tie that AutoAttack's clean pass
    in other batch sizes decides otherwise). `flags`: the messages of AutoAttack's sanity checks
    and of ours, once each: an empty tuple is what a trustworthy number looks like. `seconds`:
    wall time of this call (a resumed call counts only the chunks it ran).
    """

    robust: torch.Tensor
    clean_correct: torch.Tensor
    per_attack_acc: dict[str, float]
    flags: tuple[str, ...]
    seconds: float

    @property
    def robust_acc(self) -> float:
        return int(self.robust.sum()) / max(len(self.robust), 1)


def _model_device(model: nn.Module, x: torch.Tensor) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return x.device


def _rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG AutoAttack reseeds: the model's and the current one (it calls
    `torch.cuda.random.manual_seed`, which seeds the current device)."""
    if device.type != "cuda":
        return []
    current = torch.cuda.current_device()
    return sorted({device.index if device.index is not None else current, current})


@contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    """requires_grad off while attacking: FAB calls `backward` on the logits, which would
    otherwise accumulate into every parameter's .grad (and cost a parameter-gradient pass)."""
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


class _Capture(logging.Handler):
    """Keeps every record of the `auto-attack` logger and forwards those the caller would have
    seen anyway to where they would have gone, so raising the logger to DEBUG for the capture does
    not flood the caller's handlers (propagated records skip the ancestors' level checks)."""

    def __init__(
        self, threshold: int, handlers: list[logging.Handler], parent: logging.Logger | None
    ) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.threshold = threshold
        self.handlers = handlers
        self.parent = parent

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if record.levelno < self.threshold:
            return
        # what Logger.callHandlers would have done with the logger's own handlers and propagation
        found = 0
        chain: list[list[logging.Handler]] = [self.handlers]
        c = self.parent
        while c is not None:
            chain.append(c.handlers)
            c = c.parent if c.propagate else None
        for handlers in chain:
            for h in handlers:
                found += 1
                if record.levelno >= h.level:
                    h.handle(record)
        last = logging.lastResort
        if not found and last is not None and record.levelno >= last.level:
            last.handle(record)


@contextmanager
def _captured_log() -> Iterator[_Capture]:
    logger = logging.getLogger(AA_LOGGER)
    saved = (logger.level, logger.handlers[:], logger.propagate, logger.disabled)
    threshold = logging.CRITICAL + 1 if logger.disabled else logger.getEffectiveLevel()
    capture = _Capture(threshold, saved[1], logger.parent if logger.propagate else None)
    logger.handlers = [capture]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.disabled = False
    try:
        yield capture
    finally:
        logger.setLevel(saved[0])
        logger.handlers = saved[1]
        logger.propagate = saved[2]
        logger.disabled = saved[3]


def _reset_dynamic_check() -> None:
    """AutoAttack's dynamic-defense check counts calls in a module-level dict it never resets:
    once one model in the process trips it, every later evaluation would be flagged too."""
    try:
        from pyautoattack import checks
    except ImportError:  # pragma: no cover - the check moved; nothing to reset
        return
    funcs = getattr(checks, "funcs", None)
    if isinstance(funcs, dict):
        for k in funcs:
            funcs[k] = 0


def _make_autoattack(
    model: nn.Module,
    *,
    attacks: tuple[str, ...],
    version: str,
    eps: float,
    norm: str,
    seed: int,
    num_classes: int,
    device: torch.device,
) -> Any:
    from pyautoattack import AutoAttack

    if version == "standard":
        aa = AutoAttack(model, device=device, eps=eps, norm=NORMS[norm], seed=seed)
    else:
        aa = AutoAttack(
            model,
            attacks=list(attacks),
            device=device,
            eps=eps,
            norm=NORMS[norm],
            seed=seed,
            version="custom",
        )
        # "custom" keeps the constructor's 5 restarts for APGD-CE; the standard suite uses 1
        aa.apgd.n_restarts = 1
        aa.apgd_targeted.n_restarts = 1
    # hard-coded to 9 otherwise: more targets than wrong classes is an index error
    targets = min(MAX_TARGETS, num_classes - 1)
    aa.apgd_targeted.n_target_classes = targets
    aa.fab.n_target_classes = targets
    aa.attacks_to_run = list(attacks)
    return aa


@torch.no_grad()
def _clean_pass(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int
) -> tuple[torch.Tensor, int]:
    """Per example, correct on the clean input (CPU); and the number of logits."""
    correct, classes = [], 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size].to(device))
        classes = logits.shape[-1]
        correct.append((logits.argmax(1) == y[i : i + batch_size].to(device)).cpu())
    return (torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)), classes


def _ball_flags(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> list[str]:
    """Our own check of AutoAttack's output: every example inside the eps-ball and [0, 1]."""
    delta = (x_adv.float() - x.float()).flatten(1)
    dist = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    out = []
    if len(dist) and float(dist.max()) > eps * (1 + _BALL_TOL) + _BALL_TOL:
        out.append(f"adversarial example outside the {norm} eps-ball: {float(dist.max()):.6g}")
    if len(x_adv) and (float(x_adv.min()) < 0 or float(x_adv.max()) > 1):
        out.append("adversarial example outside the data range [0, 1]")
    return out


def _chunk_counts(
    records: list[logging.LogRecord], attacks: tuple[str, ...], robust_at_end: int
) -> list[int]:
    """AutoAttack's robust count on one chunk: clean, then after each attack.

    From its exact per-batch "k out of m successfully perturbed" records rather than the rounded
    percentages of "robust accuracy after ...": the count at the end is the robust count, and each
    attack removed the examples it perturbed (an attack skipped because none was left removed 0).
    """
    perturbed = dict.fromkeys(attacks, 0)
    for r in records:
        m = _PERTURBED.match(r.getMessage())
        if m and m.group(1) in perturbed:
            perturbed[m.group(1)] += int(m.group(2))
    counts = [robust_at_end + sum(perturbed.values())]
    for a in attacks:
        counts.append(counts[-1] - perturbed[a])
    return counts


def _load_state(path: Path, config: dict[str, Any], y: torch.Tensor) -> dict[str, Any] | None:
    """The saved progress of this evaluation, or None if there is none yet; a state file written
    for another evaluation is an error (merging two would give a number that means nothing)."""
    if not path.exists():
        return None
    state = torch.load(path, weights_only=True)
    if state.get("format") != _STATE_FORMAT:
        raise ValueError(f"AutoAttack state file {path} has format {state.get('format')!r}")
    saved = state.get("config", {})
    differ = [
        f"{k} {saved.get(k)!r} (file) vs {v!r} (now)"
        for k, v in config.items()
        if saved.get(k) != v
    ]
    if differ:
        raise ValueError(
            f"AutoAttack state file {path} was written for another evaluation: " + "; ".join(differ)
        )
    if not torch.equal(state["labels"], y):
        raise ValueError(f"AutoAttack state file {path} was written for other examples: labels")
    return state


def _save_state(path: Path, state: dict[str, Any]) -> None:
    """Atomically: an interruption while writing leaves the previous state, never half of one."""
    atomic_write(path, lambda f: torch.save(state, f))


def autoattack_eval(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    seed: int = 0,
    batch_size: int = 250,
    num_classes: int | None = None,
    state_file: Path | str | None = None,
    chunk: int = 1000,
) -> AutoAttackResult:
    """Robust accuracy of `model` (inputs in [0, 1]) on (x, y) under AutoAttack at `eps`.

    `version`: "standard" (the published suite) or "apgd" (APGD-CE + APGD-T). `num_classes`:
    default, the number of logits. With fewer than 4 classes APGD-T cannot run (its loss needs 4
    logits): it is left out and a flag says so. The examples are attacked `chunk` at a time; with
    `state_file`, the progress is saved after each chunk and a later call with the same file,
    examples and settings skips the chunks already done (same `chunk` and `seed` give the same
    flags as an uninterrupted run). The model is not fingerprinted: one state file per model.
    """
    start = time.perf_counter()
    if norm not in NORMS:
        raise ValueError(f"AutoAttack norm {norm!r} is not supported; allowed: {', '.join(NORMS)}")
    if version not in VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r}; allowed: {', '.join(VERSIONS)}")
    if chunk < 1 or batch_size < 1:
        raise ValueError(f"chunk ({chunk}) and batch_size ({batch_size}) must be positive")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} inputs but {len(y)} labels")
    n = len(x)
    y_cpu = y.detach().cpu().long()
    device = _model_device(model, x)

    with eval_mode(model):
        clean_correct, logits_dim = _clean_pass(model, x, y, device, batch_size)
    classes = num_classes if num_classes is not None else logits_dim
    if n and num_classes is not None and logits_dim != num_classes:
        raise ValueError(f"num_classes is {num_classes} but the model returns {logits_dim} logits")

    attacks = VERSIONS[version]
    own_flags: list[str] = []
    if "apgd-t" in attacks and classes < MIN_CLASSES_APGD_T:
        attacks = tuple(a for a in attacks if a != "apgd-t")
        own_flags.append(
            f"apgd-t left out: its targeted DLR loss needs {MIN_CLASSES_APGD_T} classes, "
            f"the model has {classes}"
        )
    config: dict[str, Any] = {
        "eps": float(eps),
        "norm": norm,
        "version": version,
        "seed": int(seed),
        "n": n,
        "chunk": int(chunk),
        "num_classes": int(classes),
        "attacks": list(attacks),
    }
    n_chunks = math.ceil(n / chunk)
    state_file = Path(state_file) if state_file is not None else None
    state = _load_state(state_file, config, y_cpu) if state_file is not None else None
    if state is None:
        state = {
            "format": _STATE_FORMAT,
            "config": config,
            "labels": y_cpu,
            "done": [],
            "robust": torch.zeros(n, dtype=torch.bool),
            "flags": own_flags,
            "counts": torch.zeros(n_chunks, len(attacks) + 1, dtype=torch.long),
        }

    done = set(state["done"])
    todo = [i for i in range(n_chunks) if i not in done]
    if todo:
        aa = _make_autoattack(
            model,
            attacks=attacks,
            version=version,
            eps=eps,
            norm=norm,
            seed=seed,
            num_classes=classes,
            device=device,
        )
        with (
            eval_mode(model),
            _frozen_parameters(model),
            torch.random.fork_rng(devices=_rng_devices(device)),
            _captured_log() as log,
        ):
            for i in todo:
                lo, hi = i * chunk, min((i + 1) * chunk, n)
                xc, yc = x[lo:hi], y[lo:hi]
                log.records.clear()
                _reset_dynamic_check()
                tracer = sys.gettrace()  # its dynamic check ends with sys.settrace(None)
                try:
                    x_adv, y_adv = aa.run_standard_evaluation(xc, yc, batch_size=batch_size)
                finally:
                    sys.settrace(tracer)
                aa_robust = (y_adv.cpu() == y_cpu[lo:hi]).cpu()
                new_flags = [r.getMessage() for r in log.records if r.levelno >= logging.WARNING]
                new_flags += _ball_flags(x_adv.cpu(), xc.cpu(), eps, norm)
                state["robust"][lo:hi] = clean_correct[lo:hi] & aa_robust
                state["counts"][i] = torch.tensor(
                    _chunk_counts(log.records, attacks, int(aa_robust.sum()))
                )
                state["flags"] = list(dict.fromkeys([*state["flags"], *new_flags]))
                state["done"] = sorted({*state["done"], i})
                if state_file is not None:
                    _save_state(state_file, state)

    totals = state["counts"].sum(0).tolist()
    per_attack = {
        name: count / max(n, 1) for name, count in zip(("clean", *attacks), totals, strict=True)
    }
    return AutoAttackResult(
        robust=state["robust"].clone(),
        clean_correct=clean_correct,
        per_attack_acc=per_attack,
        flags=tuple(state["flags"]),
        seconds=time.perf_counter() - start,
    )
