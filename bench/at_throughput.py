"""PGD-k adversarial-training throughput (images/s) of ResNet-18, and the fraction of the
device's peak FLOP/s it achieves.

What is timed is the trial's own training step, called, not copied: `sweep.training.student_epoch`
(the function `sweep.trial.run_trial` calls each epoch: shuffle, augmentation, non-finite guard,
zero_grad/backward/SGD step/schedule step, the loss summed on the device; every network's
forwards under `fast.training_forwards`; each batch through `fast.to_format`) for a cell
`pgd_at` x `pgd`: x' = method.adversarial(...) with `sweep.training.TrainAttack("pgd", ...)`
(L-inf, eps 8/255, k steps, the default step 2.5*eps/k, random start, the student in eval mode
during the attack), then method.loss = CE(S(x'), y). Model: `build_model("resnet18")` (CIFAR
stem, normalisation as its first layer) made ready by `fast.prepare` as a trial's student is,
SGD with the sweep's default optimiser settings, CIFAR-10-shaped random data (3x32x32 in [0, 1],
10 classes) and CIFAR-10's crop/flip augmentation. Warm-up steps are not timed. The options are
the trial's `compute:` settings (a `fast.FastPath`): bf16 (autocast of each network's forward,
fp32 logits and losses, as a trial runs it), channels_last (weights by `fast.prepare`, batches
by `to_format`) and compile (`fast.maybe_compile`: the student compiled in place); on CUDA bf16
+ channels_last are the defaults (`compute: auto`), on CPU fp32 as a trial runs.

FLOP accounting (multiply-adds count 2; FlopCounterMode counts convolutions and matmuls, not
batch norm, ReLU or the optimiser, which are a few percent and memory-bound):
- F = forward FLOPs per image, counted with torch.utils.flop_counter.FlopCounterMode on one
  batch (ResNet-18 CIFAR: about 1.1 GFLOP).
- An attack step is a forward and a backward for the input gradient only (torch.autograd.grad
  w.r.t. x): the backward still runs through every layer (grad-input of each convolution, ~F)
  but computes no weight gradient, so ~2F. The outer step is a forward plus a full backward
  (grad-input ~F, except the first convolution, and grad-weight ~F): ~3F. PGD-k step:
  ~(2k + 3) F = 23 F for k = 10, less than the usual rule of thumb 3F (k + 1) = 33 F, which
  assumes every backward also computes weight gradients.
- The script prints F, both estimates and the FLOPs counted by FlopCounterMode on one whole
  training step (the real path: attack, loss, backward), and uses the counted figure:
  achieved FLOP/s = images/s x counted FLOPs per image.

Peak: on CUDA looked up by device name (dense tensor-core figures: H100 SXM and H200 989 TFLOP/s
bf16 / 495 TF32; H100 PCIe 756 / 378; A100 312 / 156; fp32 without TF32 67 / 51 / 19.5), using
bf16 with --bf16, else TF32 when cuDNN may use it (torch's default for convolutions), else fp32.
On CPU: --peak-tflops, else measured in the same run as the best of 10 large matmuls (2048^3,
same dtype and threads) and printed as such: a measured matmul peak, not a datasheet figure.

Why: a PGD-k training step costs ~(2k + 3) / 3 standard steps (7.7 for k = 10), most of a robust
sweep's time; this says how fast a trial's step runs and how far it is from what the hardware
could do.

    python bench/at_throughput.py                       # CPU: batch 32, 5 timed steps (~40 s)
    python bench/at_throughput.py --device cuda         # bf16 + channels_last, batch 512, 20 steps
    python bench/at_throughput.py --no-bf16 --no-channels-last --compile

Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sweep.attacks import eval_mode
from sweep.data import DATASETS, Splits, make_augmentation
from sweep.fast import FastPath, maybe_compile, prepare, training_forwards
from sweep.methods import METHODS
from sweep.models import build_model
from sweep.spec import OptimSpec
from sweep.training import (
    StepLoss,
    TrainAttack,
    make_optimization,
    student_epoch,
    student_step_loss,
)

EPS = 8 / 255
# dense peak TFLOP/s (bf16, tf32, fp32) by a substring of torch.cuda.get_device_name(); the
# first match wins, so the more specific names come first
CUDA_PEAKS: list[tuple[str, tuple[float, float, float]]] = [
    ("H200", (989.0, 494.7, 66.9)),
    ("H100 PCIe", (756.0, 378.0, 51.2)),
    ("H100", (989.0, 494.7, 66.9)),  # SXM
    ("A100", (312.0, 156.0, 19.5)),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if any)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 32 CPU, 512 GPU)")
    p.add_argument("--steps", type=int, default=10, help="PGD steps k (default 10)")
    p.add_argument("--iters", type=int, default=None, help="timed steps (default 5 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 1 CPU, 5 GPU)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sync_device(device: torch.device) -> None:
    """CUDA runs asynchronously: wait for the queued work before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fast_path(bf16: bool, channels_last: bool, compile: bool) -> FastPath:
    """The trial's resolved `compute:` settings for these options (see sweep.fast.resolve)."""
    return FastPath(
        dtype=torch.bfloat16 if bf16 else None, channels_last=channels_last, compile=compile
    )


def pgd_at_cell(steps: int) -> tuple[Any, TrainAttack]:
    """The cell pgd_at x pgd as run_trial configures it: the method, and the training attack
    for an L-inf threat of eps 8/255 with k = `steps` and the attack's default step size."""
    return METHODS.get("pgd_at")({}), TrainAttack("pgd", EPS, steps, None, "linf")


class TrialTraining:
    """One trial's student training, set up as run_trial sets it up (a fresh ResNet-18 made
    ready by `fast.prepare`, the optimiser, the augmentation, the method and training attack of
    pgd_at x pgd) on `batches` batches of random CIFAR-shaped data on `device`. `run(n)` trains
    n steps through the trial's own `student_epoch`; `compile()` is the trial's
    `fast.maybe_compile` (called after the FLOPs are counted: the counter needs the eager
    model)."""

    def __init__(
        self, device: torch.device, fast: FastPath, batch: int, steps: int, batches: int
    ) -> None:
        self.device, self.fast, self.batch = device, fast, batch
        self.data = random_splits(batch * max(batches, 1), device)
        info = self.data.info
        model = build_model(
            "resnet18", in_channels=3, num_classes=info.num_classes, mean=info.mean, std=info.std
        )
        self.model = prepare(model.to(device), fast)  # as context.new_model builds a student
        self.method, self.attack = pgd_at_cell(steps)
        optim = OptimSpec().model_dump() | {"batch_size": batch}
        self.opt, self.sched = make_optimization(self.model, optim, 1, len(self.data.x_train))
        self.augmentation = make_augmentation(info, basic=True)
        self.method.start_epoch(1, 1)

    def step_loss(self) -> StepLoss:
        """The trial's step loss for this student (run it inside training_forwards)."""
        return student_step_loss(self.method, self.model, [], self.attack, self.fast)

    def compile(self) -> None:
        maybe_compile(self.model, self.fast)

    def run(self, n: int) -> None:
        """n training steps: one `student_epoch` over the first n batches."""
        d, m = self.data, n * self.batch
        part = Splits(d.info, d.x_train[:m], d.y_train[:m], d.x_val, d.y_val, d.x_test, d.y_test)
        student_epoch(
            self.method,
            self.model,
            [],
            part,
            attack=self.attack,
            fast=self.fast,
            batch_size=self.batch,
            augmentation=self.augmentation,
            optimizer=self.opt,
            schedule=self.sched,
        )


def random_splits(n: int, device: torch.device) -> Splits:
    """CIFAR-10-shaped random training data (the other splits empty)."""
    info = DATASETS.get("cifar10")
    x = torch.rand(n, *info.shape, device=device)
    y = torch.randint(0, info.num_classes, (n,), device=device)
    empty_x, empty_y = x[:0], y[:0]
    return Splits(info, x, y, empty_x, empty_y, empty_x, empty_y)


def forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    """Forward FLOPs per image, counted on one batch."""
    with FlopCounterMode(display=False) as fc, torch.no_grad(), eval_mode(model):
        model(x)
    return fc.get_total_flops() / len(x)


class _TotalsOnly:
    """Stands in for FlopCounterMode's module tracker, whose hooks make torch.autograd.grad
    fail ("A leaf node was passed to _will_engine_execute_node ...", torch 2.15), and every
    attack step calls autograd.grad. Only the total is needed, which it files under 'Global'."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _TotalsOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def step_flops(model: nn.Module, step_loss: StepLoss, data: Splits, fast: FastPath) -> float:
    """FLOPs per image of one whole training step (attack, loss, backward), counted with the
    model's forwards as in training (`training_forwards`)."""
    x, y = data.x_train[:8], data.y_train[:8]
    model.train()
    fc = FlopCounterMode(display=False)
    fc.mod_tracker = _TotalsOnly()  # type: ignore[assignment]
    with fc, training_forwards(fast, model):
        step_loss(x, y).backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / len(x)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of the best of `reps` n x n matmuls (one untimed first)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync_device(device)
        t = time.perf_counter()
        a @ b
        sync_device(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops(args: argparse.Namespace, device: torch.device) -> tuple[float, str]:
    """The peak FLOP/s to compare with, and where it came from."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12, "given with --peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, tf32, fp32) in CUDA_PEAKS:
            if key in name:
                if args.bf16:
                    return bf16 * 1e12, f"{name}: bf16 dense tensor-core peak (datasheet)"
                if torch.backends.cudnn.allow_tf32:
                    return tf32 * 1e12, f"{name}: TF32 dense tensor-core peak (datasheet)"
                return fp32 * 1e12, f"{name}: fp32 peak (datasheet)"
        print(f"no peak known for {name}: give --peak-tflops; measuring a matmul instead")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    what = str(dtype).removeprefix("torch.")
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return matmul_peak(device, dtype), f"measured matmul peak ({what}, 2048^3{threads})"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch or (512 if gpu else 32)
    iters = args.iters or (20 if gpu else 5)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.bf16 = gpu if args.bf16 is None else args.bf16
    args.channels_last = gpu if args.channels_last is None else args.channels_last
    torch.manual_seed(args.seed)

    fast = fast_path(args.bf16, args.channels_last, args.compile)
    trial = TrialTraining(device, fast, batch, args.steps, max(iters, warmup, 1))
    data, model = trial.data, trial.model
    f_fwd = forward_flops(model, data.x_train[:8])
    counted = step_flops(model, trial.step_loss(), data, fast)
    trial.compile()

    def run(n: int) -> float:
        """n training steps through the trial's student_epoch; seconds."""
        sync_device(device)
        t = time.perf_counter()
        trial.run(n)
        sync_device(device)
        return time.perf_counter() - t

    flags = [n for n, on in (("bf16", args.bf16), ("channels_last", args.channels_last)) if on]
    flags += ["compile"] * args.compile
    print(
        f"PGD-{args.steps} adversarial training (pgd_at x pgd, the trial's step), ResNet-18, "
        f"3x32x32, batch {batch}, {warmup} warm-up + {iters} timed steps"
    )
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"{' + '.join(flags) or 'fp32'}"
    )
    if warmup:
        run(warmup)
    seconds = run(iters)
    rate = batch * iters / seconds
    peak, source = peak_flops(args, device)
    k = args.steps
    print(f"{'forward FLOPs per image F':>40}: {f_fwd / 1e9:9.3f} GFLOP (FlopCounterMode)")
    print(f"{'step estimate (2k+3) F':>40}: {(2 * k + 3) * f_fwd / 1e9:9.3f} GFLOP/image")
    print(f"{'rule of thumb 3F (k+1)':>40}: {3 * (k + 1) * f_fwd / 1e9:9.3f} GFLOP/image")
    print(f"{'step, counted (used below)':>40}: {counted / 1e9:9.3f} GFLOP/image")
    print(f"{'time per step':>40}: {seconds / iters:9.3f} s")
    print(f"{'throughput':>40}: {rate:9.1f} images/s")
    print(f"{'achieved':>40}: {rate * counted / 1e12:9.3f} TFLOP/s")
    print(f"{'peak':>40}: {peak / 1e12:9.3f} TFLOP/s ({source})")
    print(f"{'fraction of peak':>40}: {rate * counted / peak:9.1%}")


if __name__ == "__main__":
    main()
