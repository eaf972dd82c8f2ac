"""PGD-20 throughput (images/s): our `sweep.attacks.pgd` against torchattacks.PGD.

"ours" is what evaluation runs: PGD on `attack_view(model)` (batch norms folded into the
convolutions, parameters frozen; the view is rebuilt for every timed batch, so its cost is
counted); "ours, unfolded" is the same PGD on the model as it is. Same model (ResNet-18 from sweep.models, CIFAR-10 shape 3x32x32, random inputs in [0, 1]), same
device, same eps / step size / steps, measured in one run with the two attacks interleaved batch
by batch (so drift in clock speed or other load hits both alike). On CUDA it also times our PGD
under bf16 autocast with channels_last memory format, the setting a GPU sweep would use.

Why: evaluation and adversarial training spend most of their time in the attack; our attack must
not be slower than a maintained implementation of the same algorithm.

    python bench/pgd_throughput.py                      # CPU: batch 64; CUDA if available: 256
    python bench/pgd_throughput.py --device cpu --batches 2

Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from sweep.attacks import attack_view, ce_objective, pgd
from sweep.models import build_model

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
EPS = 8 / 255
STEP = 2 / 255

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)"
    )
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64 CPU, 256 GPU)")
    p.add_argument("--batches", type=int, default=3, help="timed batches per attack (default 3)")
    p.add_argument("--steps", type=int, default=20, help="PGD steps (default 20)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    """CUDA runs asynchronously: wait for the queued work before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ours(
    model: nn.Module,
    steps: int,
    context: Callable[[], AbstractContextManager] = nullcontext,
    *,
    fold: bool = True,
) -> Attack:
    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        net = attack_view(model) if fold else model
        with context():
            return pgd(net, x, ce_objective(y), eps=EPS, steps=steps, step_size=STEP)

    return run


def _timed(attack: Attack, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    attack(x, y)
    _sync(device)
    return time.perf_counter() - start


def bench(attacks: dict[str, Attack], inputs: list, device: torch.device) -> dict[str, float]:
    """Images/s of each attack: one warm-up batch each, then the timed batches interleaved,
    in alternating order."""
    warm_x, warm_y = inputs[0]
    for attack in attacks.values():
        attack(warm_x, warm_y)
    seconds = dict.fromkeys(attacks, 0.0)
    for i, (x, y) in enumerate(inputs[1:]):
        order = list(attacks.items())
        for name, attack in order[::-1] if i % 2 else order:  # neither always goes first
            seconds[name] += _timed(attack, x, y, device)
    images = sum(len(x) for x, _ in inputs[1:])
    return {name: images / s for name, s in seconds.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    batch = args.batch or (256 if device.type == "cuda" else 64)
    torch.manual_seed(args.seed)
    model = build_model(
        "resnet18", in_channels=3, num_classes=10, mean=CIFAR_MEAN, std=CIFAR_STD
    ).to(device)
    model.eval()
    inputs = [
        (
            torch.rand(batch, 3, 32, 32, device=device),
            torch.randint(0, 10, (batch,), device=device),
        )
        for _ in range(args.batches + 1)
    ]

    attacks: dict[str, Attack] = {
        "ours": _ours(model, args.steps),
        "ours, unfolded": _ours(model, args.steps, fold=False),
    }
    try:
        import torchattacks
    except ImportError:
        print("torchattacks is not installed: timing ours only")
    else:
        attacks["torchattacks"] = torchattacks.PGD(model, eps=EPS, alpha=STEP, steps=args.steps)

    print(f"PGD-{args.steps}, ResNet-18, 3x32x32, batch {batch}, {args.batches} timed batches")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    rates = bench(attacks, inputs, device)
    if device.type == "cuda":
        # channels_last changes the model's memory format in place: time it last
        model.to(memory_format=torch.channels_last)
        cl_inputs = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in inputs]

        def bf16() -> AbstractContextManager:
            return torch.autocast("cuda", dtype=torch.bfloat16)

        rates |= bench(
            {"ours bf16+channels_last": _ours(model, args.steps, bf16)}, cl_inputs, device
        )
    for name, rate in rates.items():
        print(f"{name:>32}: {rate:9.1f} images/s")
    if "torchattacks" in rates:
        for name in ("ours", "ours, unfolded"):
            ratio = rates[name] / rates["torchattacks"]
            print(f"{name + ' / torchattacks':>32}: {ratio:9.3f}")


if __name__ == "__main__":
    main()
