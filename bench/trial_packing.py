"""Packing trials on one device: N PGD-10 training trials side by side vs one alone (images/s).

A sweep with `resources.gpus_per_trial: 0.25` has Ray Tune run four trial actors on one GPU at
once. This measures what that buys: each trial is a Ray actor with 1/N of the device (exactly the
request Tune makes for a trial: `num_gpus=1/N`, `num_cpus=--cpus`), running the trial's own
training step for `pgd_at` x `pgd` (bench/at_throughput.py's TrialTraining: the function
`run_trial` calls each epoch, `sweep.training.student_epoch`, on a ResNet-18 made ready by
`fast.prepare`, CIFAR-shaped random data already on the device, CIFAR augmentation on the
device; bf16 + channels_last on a GPU as a trial's fast path uses them: autocast of each
network's forward, not of the whole step).

Measured in one run, one after the other: first one actor alone (the device to itself), then N
actors. Every actor builds its model and data and runs its warm-up steps before the clock starts;
the timed steps of the N actors are started together and the packed figure is all their images
over the span from the first start to the last end (not the sum of per-actor rates, which would
flatter an uneven finish). Printed: per-actor and total images/s and the ratio packed / alone.

Why: project issue 9 asks for >= 2.5x with 4 ResNet-18 trials (batch 128) on one H100/H200; small
models leave a big GPU mostly idle, and packing is how a sweep fills it.

    python bench/trial_packing.py                        # GPU: 4 trials, batch 128, 30 steps
    python bench/trial_packing.py --trials 2 --batch 256
    python bench/trial_packing.py --device cpu           # 2 trials of 1 CPU each (a smoke run)

On CPU the figure says how two 1-thread trials share two cores, not much about a GPU.
Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import ray
import torch

BENCH = str(Path(__file__).resolve().parent)
sys.path.insert(0, BENCH)
import at_throughput as at  # noqa: E402  (a sibling script: the trial's training, set up)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda if any)")
    p.add_argument("--trials", type=int, default=None, help="trials packed (default 4 GPU, 2 CPU)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 128 GPU, 16 CPU)")
    p.add_argument("--steps", type=int, default=10, help="PGD steps k (default 10)")
    p.add_argument("--iters", type=int, default=None, help="timed steps (default 30 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 GPU, 1 CPU)")
    p.add_argument("--cpus", type=float, default=1, help="CPUs per trial actor (default 1)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile each trial's model")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@ray.remote
class TrialActor:
    """One trial's training step, set up and warmed up in __init__, timed in run()."""

    def __init__(self, args: dict[str, Any], seed: int) -> None:
        self.args = args
        gpu = args["device"] == "cuda"
        self.device = torch.device("cuda" if gpu else "cpu")
        if not gpu:
            torch.set_num_threads(max(1, int(args["cpus"])))
        torch.manual_seed(seed)
        fast = at.fast_path(args["bf16"], args["channels_last"], args["compile"])
        batches = max(args["iters"], args["warmup"], 1)
        self.trial = at.TrialTraining(self.device, fast, args["batch"], args["steps"], batches)
        self.trial.compile()
        if args["warmup"]:
            self._steps(args["warmup"])

    def _steps(self, n: int) -> None:
        self.trial.run(n)
        at.sync_device(self.device)

    def ready(self) -> str:
        return torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu"

    def run(self) -> tuple[float, float, int, float]:
        """(start, end, images, peak device memory GiB) of the timed steps; wall clock."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.time()
        self._steps(self.args["iters"])
        end = time.time()
        mem = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else 0.0
        return start, end, self.args["iters"] * self.args["batch"], mem


def measure(args: dict[str, Any], n: int) -> dict[str, Any]:
    """n actors of 1/n device each: set up and warm up all, then time them together."""
    gpu = args["device"] == "cuda"
    opts = {"num_cpus": args["cpus"], "num_gpus": 1 / n if gpu else 0}
    actors = [TrialActor.options(**opts).remote(args, args["seed"] + i) for i in range(n)]
    names = ray.get([a.ready.remote() for a in actors])
    spans = ray.get([a.run.remote() for a in actors])
    for a in actors:
        ray.kill(a)
    first, last = min(s[0] for s in spans), max(s[1] for s in spans)
    return {
        "device": names[0],
        "per_actor": [s[2] / (s[1] - s[0]) for s in spans],
        "memory": [s[3] for s in spans],
        "rate": sum(s[2] for s in spans) / (last - first),
        "span": last - first,
    }


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = a.device == "cuda"
    args = {
        "device": a.device,
        "trials": a.trials or (4 if gpu else 2),
        "batch": a.batch or (128 if gpu else 16),
        "steps": a.steps,
        "iters": a.iters or (30 if gpu else 3),
        "warmup": a.warmup if a.warmup is not None else (5 if gpu else 1),
        "cpus": a.cpus,
        "bf16": gpu if a.bf16 is None else a.bf16,
        "channels_last": gpu if a.channels_last is None else a.channels_last,
        "compile": a.compile,
        "seed": a.seed,
    }
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback
    # Ray's workers import at_throughput as this process does: bench/ on their path
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [BENCH, os.environ.get("PYTHONPATH")]))
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    flags = [k for k in ("bf16", "channels_last", "compile") if args[k]]
    n = args["trials"]
    print(
        f"PGD-{args['steps']} training step (pgd_at x pgd), ResNet-18, 3x32x32, batch "
        f"{args['batch']}, {args['warmup']} warm-up + {args['iters']} timed steps per trial, "
        f"{' + '.join(flags) or 'fp32'}; {args['cpus']:g} CPU per trial actor",
        flush=True,
    )
    alone = measure(args, 1)
    print(f"device {alone['device']}, torch {torch.__version__}, ray {ray.__version__}")
    print(f"{'1 trial alone':>28}: {alone['rate']:9.1f} images/s", flush=True)
    packed = measure(args, n)
    share = f"1/{n} GPU" if gpu else f"{args['cpus']:g} CPU"
    each = ", ".join(f"{r:.1f}" for r in packed["per_actor"])
    print(f"{f'{n} trials packed ({share} each)':>28}: {packed['rate']:9.1f} images/s")
    print(f"{'per trial':>28}: {each} images/s")
    if gpu:
        mem = ", ".join(f"{m:.1f}" for m in packed["memory"])
        print(f"{'peak memory per trial':>28}: {mem} GiB")
    print(f"{'packed / alone':>28}: {packed['rate'] / alone['rate']:9.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
