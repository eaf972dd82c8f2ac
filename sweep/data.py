"""Datasets as tensors, split deterministically, augmented per batch on the device.

Why tensors and not DataLoaders: the datasets we sweep over fit in memory (on the GPU too), and
per-batch augmentation on the device removes the loader from the hot path (the airbench recipe).
Images are float32 in [0, 1]; normalisation is the model's first layer, so attack eps is in
pixel scale.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .files import atomic_write, locked
from .registry import Registry


@dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the system needs to know about a dataset without loading it."""

    name: str
    load: Callable[[Path, bool], tuple[torch.Tensor, ...]]
    num_classes: int
    shape: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool  # horizontal flips are label-preserving (not for digits)
    crop_pad: int  # random-crop padding used by augmentation
    bundled: bool  # ships with a package: no download, no data_dir
    has_test_split: bool  # an official test split exists
    size: int  # examples in the official training split (all examples when there is no test split)


# `@DATASETS.register(name, num_classes=..., ...)` on a loader `load(data_dir, download)`
DATASETS: Registry[DatasetInfo] = Registry("dataset", entry=DatasetInfo)


@DATASETS.register(
    "digits",
    num_classes=10,
    shape=(1, 8, 8),
    mean=(0.3053,),
    std=(0.3760,),
    flip=False,
    crop_pad=1,
    bundled=True,
    has_test_split=False,
    size=1797,
)
def _load_digits(data_dir: Path, download: bool) -> tuple[torch.Tensor, ...]:
    """scikit-learn's bundled 8x8 digits. Read straight from its CSV: importing
    sklearn.datasets costs ~2 s in every fresh Ray worker, the file 15 ms."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec else None
    if csv is not None and csv.exists():
        a = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        images, target = a[:, :-1].reshape(-1, 8, 8), a[:, -1].astype(np.int64)
    else:  # a scikit-learn that keeps the file elsewhere
        from sklearn.datasets import load_digits

        d = load_digits()
        images, target = d.images, d.target
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(target, dtype=torch.long)
    return (x, y)


SPLITS = ("x_train", "y_train", "x_test", "y_test")
CHECKSUM = "sha256"  # beside the tensors in a cache file: what they hashed to when written


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy())  # zero-copy: a CPU tensor's buffer
    return h.hexdigest()


def _read_cache(path: Path) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The cached tensors, or None and why not ("" when there is no file)."""
    if not path.exists():
        return None, ""
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or garbled: the zip reader or the unpickler says how
        return None, f"unreadable ({type(e).__name__}: {str(e)[:200]})"
    if not isinstance(t, dict) or any(not isinstance(t.get(k), torch.Tensor) for k in SPLITS):
        return None, f"not a dataset cache (expected tensors {', '.join(SPLITS)})"
    tensors = {k: t[k] for k in SPLITS}
    if CHECKSUM in t and t[CHECKSUM] != _digest(tensors):  # caches of older versions have none
        return None, "checksum mismatch (its contents changed after it was written)"
    return tensors, ""


def cached_tensors(
    path: Path, build: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The tensors cached at `path`, built (by `build`) and cached when missing or damaged.

    Why a lock and an atomic write: trials starting together on one machine (or sharing
    data_dir) would each build and write the same file in place, and a kill in the middle of
    that write left a truncated file that failed every later trial. Now one process builds while
    the others wait and then read its file, which appears whole or not at all; a damaged file
    (truncated, garbled, checksum mismatch) is rebuilt with a warning. A valid cache is read
    without the lock, so a read-only data_dir with a cache in it works."""
    tensors, _ = _read_cache(path)
    if tensors is not None:
        return tensors
    with locked(path.with_name(path.name + ".lock")):
        tensors, problem = _read_cache(path)  # another process may have built it meanwhile
        if tensors is not None:
            return tensors
        if problem:
            print(f"warning: dataset cache {path} is damaged: {problem}; rebuilding it", flush=True)
        print(f"building the dataset cache {path}", flush=True)
        tensors = build()
        digest = _digest(tensors)
        atomic_write(path, lambda f: torch.save({**tensors, CHECKSUM: digest}, f))
    return tensors


def _torchvision_loader(cls_name: str, split_kw: str) -> Callable[[Path, bool], tuple]:
    """Loader for a torchvision dataset, cached as uint8 tensors in `data_dir` after first use
    (`cached_tensors`)."""

    def build(data_dir: Path, download: bool) -> dict[str, torch.Tensor]:
        import torchvision

        cls = getattr(torchvision.datasets, cls_name)
        out = {}
        for part in ("train", "test"):
            kw = {split_kw: part} if split_kw == "split" else {split_kw: part == "train"}
            try:
                ds = cls(str(data_dir), download=download, **kw)
            except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
                raise FileNotFoundError(
                    f"{cls_name} not found under {data_dir}: set dataset.download: true "
                    f"or put the files there ({e})"
                ) from None
            data = np.asarray(ds.data)
            if data.ndim == 3:  # MNIST: N,H,W
                data = data[:, None]
            elif data.shape[-1] == 3:  # CIFAR: N,H,W,C
                data = data.transpose(0, 3, 1, 2)
            labels = getattr(ds, "targets", None)
            if labels is None:
                labels = ds.labels
            out[f"x_{part}"] = torch.from_numpy(np.ascontiguousarray(data)).to(torch.uint8)
            out[f"y_{part}"] = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        return out

    def load(data_dir: Path, download: bool) -> tuple[torch.Tensor, ...]:
        data_dir = Path(data_dir).expanduser()
        cache = data_dir / f"kdsweep-{cls_name.lower()}.pt"
        out = cached_tensors(cache, lambda: build(data_dir, download))
        return tuple(out[k] for k in SPLITS)

    return load


def _torchvision(
    name: str,
    cls: str,
    classes: int,
    shape: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    flip: bool,
    split_kw: str,
    size: int,
) -> None:
    """Register a torchvision dataset (its loader is made here, so the decorator is called)."""
    DATASETS.register(
        name,
        num_classes=classes,
        shape=shape,
        mean=mean,
        std=std,
        flip=flip,
        crop_pad=2 if shape[1] == 28 else 4,
        bundled=False,
        has_test_split=True,
        size=size,
    )(_torchvision_loader(cls, split_kw))


_torchvision("mnist", "MNIST", 10, (1, 28, 28), (0.1307,), (0.3081,), False, "train", 60000)
_torchvision(
    "cifar10",
    "CIFAR10",
    10,
    (3, 32, 32),
    (0.4914, 0.4822, 0.4465),
    (0.2470, 0.2435, 0.2616),
    True,
    "train",
    50000,
)
_torchvision(
    "cifar100",
    "CIFAR100",
    100,
    (3, 32, 32),
    (0.5071, 0.4865, 0.4409),
    (0.2673, 0.2564, 0.2762),
    True,
    "train",
    50000,
)
_torchvision(
    "svhn",
    "SVHN",
    10,
    (3, 32, 32),
    (0.4377, 0.4438, 0.4728),
    (0.1980, 0.2010, 0.1970),
    False,
    "split",
    73257,
)


@dataclass
class Splits:
    """Train / validation / test tensors. Validation is carved from train; tuning sees only it."""

    info: DatasetInfo
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def refit(self) -> Splits:
        """The validation examples moved into training (validation left empty): how a cell's
        best configuration is retrained for its final numbers once tuning no longer needs them,
        as the literature trains on all 50k CIFAR images."""
        return Splits(
            self.info,
            torch.cat([self.x_train, self.x_val]),
            torch.cat([self.y_train, self.y_val]),
            self.x_val[:0],
            self.y_val[:0],
            self.x_test,
            self.y_test,
        )

    def to(self, device: torch.device | str) -> Splits:
        moved = {
            k: getattr(self, k).to(device)
            for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
        }
        return Splits(self.info, **moved)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def split_sizes(info: DatasetInfo, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Train / validation sizes (and test, where carved) that `load_splits` will make, without
    loading: what `sweep validate` prints as the protocol."""
    out = {}
    n = info.size
    if not info.has_test_split:
        out["test"] = carved(test_fraction, n)
        n -= out["test"]
    n_val = carved(val_fraction, n)
    return {"train": n - n_val, "val": n_val, **out}


def carved(fraction: float, n: int) -> int:
    """How many of n examples a split of `fraction` takes: the one rounding rule of
    `load_splits` and `split_sizes`."""
    return int(round(fraction * n))


def load_splits(
    name: str,
    *,
    data_dir: str | Path = "~/.cache/kdsweep/data",
    download: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> Splits:
    """Load a dataset and split it deterministically (same seed -> same examples in each split)."""
    info = DATASETS.get(name)
    parts = info.load(Path(data_dir).expanduser(), download)
    gen = torch.Generator().manual_seed(split_seed)
    if info.has_test_split:
        x, y, x_test, y_test = parts
    else:
        x, y = parts
        perm = torch.randperm(len(x), generator=gen)
        n_test = carved(test_fraction, len(x))
        x_test, y_test = x[perm[:n_test]], y[perm[:n_test]]
        x, y = x[perm[n_test:]], y[perm[n_test:]]
    perm = torch.randperm(len(x), generator=gen)
    n_val = carved(val_fraction, len(x))
    val, train = perm[:n_val], perm[n_val:]
    return Splits(
        info,
        _as_float(x[train]),
        y[train],
        _as_float(x[val]),
        y[val],
        _as_float(x_test),
        y_test,
    )


def augment(x: torch.Tensor, *, flip: bool, crop_pad: int) -> torch.Tensor:
    """Random crop (zero padding) and optional horizontal flip, for a whole batch at once.

    Zero padding, as every reference's `RandomCrop(32, padding=4)` (TRADES, ARD, IAD, RSLAD,
    MTARD): images are in [0, 1] before normalisation, so the pad is black, as torchvision's.
    """
    n, c, h, w = x.shape
    if crop_pad > 0:
        p = crop_pad
        padded = F.pad(x, (p, p, p, p), mode="constant", value=0.0)
        di = torch.randint(0, 2 * p + 1, (n, 1), device=x.device)
        dj = torch.randint(0, 2 * p + 1, (n, 1), device=x.device)
        rows = (di + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dj + torch.arange(w, device=x.device))[:, None, None, :]
        idx_n = torch.arange(n, device=x.device)[:, None, None, None]
        idx_c = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[idx_n, idx_c, rows, cols]
    if flip:
        mask = torch.rand(n, device=x.device) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


STRONG_AUGMENTATIONS = ("none", "autoaugment")
AUTOAUGMENT_GROUP = 8  # images that share one random sub-policy


@functools.lru_cache(maxsize=2)
def _autoaugment(policy: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from torchvision.transforms import v2

    return v2.AutoAugment(v2.AutoAugmentPolicy(policy))


def autoaugment(x: torch.Tensor, *, policy: str = "cifar10") -> torch.Tensor:
    """AutoAugment (Cubuk et al. 2019) with torchvision's learned policy, on a float batch in
    [0, 1]. torchvision draws one sub-policy per call; calling it per group of
    AUTOAUGMENT_GROUP images (not per image) keeps the cost at a few ms per batch on CPU while
    still mixing 16 sub-policies into a batch of 128."""
    aa = _autoaugment(policy)
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8)
    out = torch.cat([aa(chunk) for chunk in u8.split(AUTOAUGMENT_GROUP)])
    return out.to(x.dtype) / 255


def make_augmentation(
    info: DatasetInfo, *, basic: bool, strong: str = "none"
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The training-batch augmentation: crop/flip (`basic`), then AutoAugment (`strong`)."""
    if strong not in STRONG_AUGMENTATIONS:
        raise ValueError(f"unknown strong augmentation {strong!r}; allowed: {STRONG_AUGMENTATIONS}")
    if not basic and strong == "none":
        return None
    policy = "svhn" if info.name == "svhn" else "cifar10"

    def apply(x: torch.Tensor) -> torch.Tensor:
        if basic:
            x = augment(x, flip=info.flip, crop_pad=info.crop_pad)
        if strong == "autoaugment":
            x = autoaugment(x, policy=policy)
        return x

    return apply


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of tensors already on their device; the global torch RNG drives shuffling."""
    n = len(x)
    order = torch.randperm(n, device=x.device) if shuffle else torch.arange(n, device=x.device)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]
