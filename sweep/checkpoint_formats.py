"""Teachers users already have: a checkpoint file, verified, then mapped onto our models.

Why: a TRADES WRN-34-10 teacher costs about 12 GPU-hours to train and RobustBench ships one
(`Zhang2019Theoretically`); loading it takes seconds. Two guarantees: the bytes are checked
against the sha256 the sweep file gives **before** anything is unpickled (and only with
`torch.load(weights_only=True)`), so a swapped or truncated file is refused, never run; and each
format says exactly how its keys become those of `models.build_model(arch)`.

Formats:

- `state_dict`: the state_dict of kdsweep's own model (`build_model(arch)`: `0.mean`, `0.std` of
  the Normalize layer, then `1.<body>`), as the teacher cache stores it.
- `robustbench`: RobustBench's model-zoo `WideResNet` (robustbench/model_zoo/architectures/
  wide_resnet.py, read 2026-11), e.g. `Zhang2019Theoretically` = WideResNet(34, 10,
  sub_block1=True). Its parameter names are TRADES's, which our `WideResNet` keeps (conv1,
  block{1,2,3}.layer.<i>.{bn1,conv1,bn2,conv2,convShortcut}, bn1, fc; its ReLUs have no state);
  the unused `sub_block1` is dropped; `module.` / `model.` prefixes and a {"state_dict": ..}
  wrapper are removed, as RobustBench's load_model does. Its models take [0, 1]
  inputs without normalisation, so our Normalize layer is set to the identity (mean 0, std 1).
  Its forward pools with avg_pool2d(8) where ours pools adaptively: equal on 32x32 inputs.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

FORMATS = ("state_dict", "robustbench")


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded: wrong bytes, or keys that do not fit."""


def check_sha256(blob: bytes, sha256: str, who: str, uri: str) -> None:
    """Refuse bytes whose sha256 is not the one the sweep file pins."""
    actual = hashlib.sha256(blob).hexdigest()
    if actual != sha256.lower():
        raise CheckpointError(
            f"teacher {who}: checkpoint {uri} has sha256 {actual}, the sweep file expects "
            f"{sha256.lower()}; refusing to load it (nothing was unpickled)"
        )


def verified_state(blob: bytes, sha256: str, who: str, uri: str) -> dict[str, Any]:
    """The state dict in `blob`, only if its sha256 is `sha256` (then weights_only)."""
    check_sha256(blob, sha256, who, uri)
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"teacher {who}: {uri} holds a {type(state).__name__}, not a dict")
    return state


def _unwrap(state: dict[str, Any]) -> dict[str, Any]:
    """As RobustBench's load_model: a {"state_dict": ...} (or {"model": ...}) wrapper, and the
    `module.` (DataParallel) and `model.` prefixes, removed."""
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}


def from_robustbench(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """RobustBench WideResNet keys -> ours (see the module docstring), Normalize = identity."""
    body = {k: v for k, v in _unwrap(state).items() if not k.startswith("sub_block1.")}
    out = {f"1.{k}": v for k, v in body.items()}
    ours = model.state_dict()
    out["0.mean"] = torch.zeros_like(ours["0.mean"])
    out["0.std"] = torch.ones_like(ours["0.std"])
    return out


def to_robustbench(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse, for tests and for exporting: our WideResNet's state dict as RobustBench's
    (no Normalize; the model must have been used with identity normalisation)."""
    return {k.removeprefix("1."): v for k, v in state.items() if k.startswith("1.")}


def _ours(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    return dict(state)


MAPPINGS: dict[str, Callable[[dict[str, Any], nn.Module], dict[str, Any]]] = {
    "state_dict": _ours,
    "robustbench": from_robustbench,
}


def load_state(model: nn.Module, blob: bytes, *, uri: str, sha256: str, fmt: str, who: str) -> None:
    """Verify the file's bytes `blob`, map its keys and load them (strict: every key of `model`
    and no other) into `model`. Reading the bytes is the caller's (teachers.load_checkpoint):
    this module stays plain PyTorch. `uri` and `who` only name the file and teacher in errors."""
    if fmt not in MAPPINGS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; allowed: {', '.join(FORMATS)}")
    state = MAPPINGS[fmt](verified_state(blob, sha256, who, uri), model)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"teacher {who}: checkpoint {uri} (format {fmt}) does not fit the model: missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # shapes: another width, depth or number of classes
        raise CheckpointError(f"teacher {who}: checkpoint {uri} (format {fmt}): {e}") from None
