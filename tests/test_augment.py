"""Training-batch augmentation: crop/flip, and AutoAugment as the strong option."""

from __future__ import annotations

import torch

from sweep.data import DATASETS, make_augmentation
from sweep.spec import parse_spec
from sweep.teachers import teacher_hash, teacher_identity


def test_autoaugment_changes_images_keeps_range_and_shape_and_follows_the_seed():
    info = DATASETS.get("cifar10")
    aug = make_augmentation(info, basic=False, strong="autoaugment")
    x = torch.rand(32, 3, 32, 32)
    torch.manual_seed(0)
    a = aug(x)
    torch.manual_seed(0)
    b = aug(x)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)  # reproducible under the trial's seed
    changed = [(a[i] - x[i]).abs().max() > 1 / 255 for i in range(32)]
    assert sum(changed) >= 8  # most sub-policies change the image


def test_no_augmentation_is_none_and_basic_only_is_crop_and_flip():
    info = DATASETS.get("digits")
    assert make_augmentation(info, basic=False) is None
    aug = make_augmentation(info, basic=True)
    x = torch.rand(16, 1, 8, 8)
    assert aug(x).shape == x.shape


def test_strong_augmentation_is_part_of_a_teachers_identity():
    base = {
        "name": "a",
        "grid": {"teacher_loss": ["ce"], "method": ["kd"], "train_attack": ["none"]},
    }
    plain = parse_spec(base)
    strong = parse_spec({**base, "dataset": {"strong_augment": "autoaugment"}})
    (t,) = plain.teacher_variants().values()
    assert teacher_hash(teacher_identity(plain, t)) != teacher_hash(teacher_identity(strong, t))
    # and leaving it unset keeps the hashes of caches made before the option existed
    assert "strong_augment" not in teacher_identity(plain, t)["dataset"]
