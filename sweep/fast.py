"""The fast path of a training step on a GPU: bf16 autocast, channels_last, torch.compile.

What `compute:` in the sweep file asks for, resolved against the trial's device (`auto` = on with
CUDA, off on a CPU, where bf16 autocast and NHWC convolutions are slower than fp32, not faster).

Scope, and why:
- Autocast covers the *forward passes of training steps* only: the student's and the teachers'
  forwards inside the attack iterations and the loss. It is switched on per model
  (`Classifier.compute_dtype`, see models.py) for the duration of a training epoch, not around
  the whole step, so the logits leave each network in fp32 and every loss term after them
  (temperature-scaled log-softmax and KL, cross-entropy, GACD's similarity matmuls, the attack
  objectives) runs in fp32 -- a `torch.autocast` around the whole step would run those matmuls in
  bf16 too. Validation and test evaluation stay fp32, so robust accuracy is measured as before.
- channels_last converts the weights once (`prepare`) and each model input on entry (a no-op for
  inputs already in that format).
- torch.compile compiles the student in place (`nn.Module.compile`: the state_dict keys stay
  those of the plain model, so checkpoints and the teacher cache do not notice). Nothing is cached
  here by hand: dynamo keys its cache by the forward's code object and, with nn modules inlined
  (torch's default), guards on the modules' types, shapes and attributes, not on the instance, so
  the new student of the next trial in a reused Tune actor runs the graphs compiled for the
  previous one without recompiling (measured: torch 2.15, CPU, SmallCNN: first trial 176 s of
  compilation, the next ones 0 s, `unique_graphs` unchanged). A new worker process recompiles,
  but inductor's on-disk FX-graph and AOT-autograd caches (on by default) cut that (176 s -> 8 s
  here). Switching train/eval mode or the compute dtype adds one guarded graph each.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# the compiler torch.compile uses; tests set "eager" to check the wiring without inductor's
# minutes of C++ compilation on a CPU
COMPILE_BACKEND = "inductor"


@dataclass(frozen=True)
class FastPath:
    """Resolved compute settings of one trial: what its training steps actually use."""

    dtype: torch.dtype | None = None  # autocast dtype of training forwards; None = plain fp32
    channels_last: bool = False
    compile: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


OFF = FastPath()


def resolve(compute: Any, device: torch.device) -> FastPath:
    """`compute` is the sweep file's ComputeSpec (precision auto|fp32|bf16, channels_last
    auto|on|off, compile); `auto` means on for CUDA, off otherwise."""
    if compute is None:
        return OFF
    cuda = device.type == "cuda"
    precision = compute.precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    channels_last = compute.channels_last == "on" or (compute.channels_last == "auto" and cuda)
    return FastPath(
        dtype=torch.bfloat16 if precision == "bf16" else None,
        channels_last=channels_last,
        compile=bool(compute.compile),
    )


def prepare(model: nn.Module, fast: FastPath) -> nn.Module:
    """Weights (and, for a `Classifier`, its inputs) in channels_last when asked; in place.
    Call before the optimiser sees the parameters' values and before a state_dict is loaded.
    On CUDA with any fast-path setting on, cuDNN also times its convolution algorithms once per
    shape and keeps the fastest (`cudnn.benchmark`): a trial's batches all have one shape.
    (That choice may differ between runs: GPU results are not bit-reproducible anyway.)"""
    on_cuda = any(p.is_cuda for p in model.parameters())
    if on_cuda and fast != OFF:
        torch.backends.cudnn.benchmark = True
    if fast.channels_last:
        model.to(memory_format=torch.channels_last)
        if hasattr(model, "channels_last"):
            model.channels_last = True
    return model


def maybe_compile(model: nn.Module, fast: FastPath) -> nn.Module:
    """torch.compile `model` in place when asked (see the module docstring for what is reused
    across trials)."""
    if fast.compile:
        model.compile(backend=COMPILE_BACKEND)
    return model


@contextmanager
def training_forwards(fast: FastPath, *models: nn.Module) -> Iterator[None]:
    """Within the block, every given model that supports it (a `Classifier` from build_model)
    runs its forwards under autocast to `fast.dtype` and returns fp32 logits; restored on exit,
    so the evaluation after a training epoch runs as it always has."""
    targets = [m for m in models if hasattr(m, "compute_dtype")]
    before = [m.compute_dtype for m in targets]
    for m in targets:
        m.compute_dtype = fast.dtype
    try:
        yield
    finally:
        for m, dtype in zip(targets, before, strict=True):
            m.compute_dtype = dtype


def to_format(x: torch.Tensor, fast: FastPath) -> torch.Tensor:
    """A batch in the memory format the models use (a no-op when channels_last is off)."""
    if fast.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
