"""Deterministic splits, on-device augmentation, architectures."""

from __future__ import annotations

import pytest
import torch

from sweep.data import augment, load_splits
from sweep.models import MODELS, build_model


def test_digits_split_is_deterministic_disjoint_and_complete():
    a = load_splits("digits", split_seed=3)
    b = load_splits("digits", split_seed=3)
    c = load_splits("digits", split_seed=4)
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_val, c.x_val)
    n = len(a.x_train) + len(a.x_val) + len(a.x_test)
    assert n == 1797
    assert len(a.x_test) == round(0.2 * 1797)
    rows = {tuple(r.tolist()) for r in a.x_train.flatten(1)}
    assert not any(tuple(r.tolist()) in rows for r in a.x_test.flatten(1))
    assert a.x_train.min() >= 0 and a.x_train.max() <= 1 and a.x_train.shape[1:] == (1, 8, 8)


def test_augment_crops_are_shifts_of_the_reflect_padded_image():
    torch.manual_seed(0)
    x = torch.rand(32, 3, 6, 6)
    out = augment(x, flip=False, crop_pad=1)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    for i in range(32):
        assert any(
            torch.equal(out[i], padded[i, :, di : di + 6, dj : dj + 6])
            for di in range(3)
            for dj in range(3)
        )
    assert not torch.equal(out, x)


def test_augment_flip_mirrors_about_half_of_a_batch():
    torch.manual_seed(0)
    x = torch.rand(400, 1, 4, 4)
    out = augment(x, flip=True, crop_pad=0)
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(400)]
    same = [torch.equal(out[i], x[i]) for i in range(400)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 150 < sum(flipped) < 250


@pytest.mark.parametrize("arch", MODELS.names())
def test_every_model_maps_images_to_logits_and_normalises_first(arch):
    m = build_model(
        arch, in_channels=3, num_classes=7, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
    ).eval()
    x = torch.rand(2, 3, 32, 32)
    assert m(x).shape == (2, 7)
    assert torch.allclose(m[0](x), (x - 0.5) / 0.25)
