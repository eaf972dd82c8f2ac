"""Deterministic splits, on-device augmentation, architectures."""

from __future__ import annotations

import functools

import pytest
import torch

from sweep.data import augment, load_splits
from sweep.models import MODELS, build_model, forward_features


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


def test_digits_read_from_the_csv_are_scikit_learns_digits():
    """_load_digits reads sklearn's file itself (no sklearn.datasets import): same data."""
    from sklearn.datasets import load_digits

    from sweep.data import _load_digits

    x, y = _load_digits(None, False)
    d = load_digits()
    assert torch.equal(x, torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0)
    assert torch.equal(y, torch.tensor(d.target, dtype=torch.long))


def test_augment_crops_are_shifts_of_the_zero_padded_image():
    torch.manual_seed(0)
    x = torch.rand(32, 3, 6, 6)
    out = augment(x, flip=False, crop_pad=1)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="constant", value=0.0)
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


# --- CIFAR architectures and feature taps -------------------------------------------------------

_NEW_ARCHS = ["preact_resnet18", "wrn34_10", "mobilenetv2"]


@functools.cache
def _built(arch: str, in_channels: int, num_classes: int) -> torch.nn.Module:
    """Built once per test session (WRN-34-10 takes about a second to initialise on one core);
    the tests below only evaluate these models, in eval mode."""
    torch.manual_seed(0)
    mean, std = (0.5,) * in_channels, (0.25,) * in_channels
    m = build_model(arch, in_channels=in_channels, num_classes=num_classes, mean=mean, std=std)
    return m.eval()


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_cifar_architectures_are_registered():
    assert {"small_cnn", "resnet18", *_NEW_ARCHS} <= set(MODELS.names())


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8)], ids=["cifar", "digits"])
@pytest.mark.parametrize("arch", MODELS.names())
def test_every_model_builds_for_cifar_and_digits_and_its_feature_tap_gives_its_logits(arch, shape):
    """Adaptive pooling lets every arch take 8x8 digits; forward_features returns the
    penultimate features and logits equal to model(x) bit for bit."""
    m = _built(arch, shape[0], 10)
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = m(x)
        feats, tapped = forward_features(m, x)
    assert logits.shape == (3, 10)
    assert torch.equal(tapped, logits)
    head = m[1].head
    assert isinstance(head, torch.nn.Linear) and feats.shape == (3, head.in_features)
    # the head applied to the features is the logits: the features really are penultimate
    assert torch.equal(head(feats), logits)


def test_forward_features_in_training_mode_matches_the_forward_pass():
    torch.manual_seed(0)
    m = build_model("resnet18", in_channels=1, num_classes=4, mean=(0.5,), std=(0.25,)).train()
    x = torch.rand(4, 1, 8, 8)
    logits = m(x)  # batch statistics: the same batch gives the same output in both passes
    assert torch.equal(forward_features(m, x)[1], logits)
    logits.sum().backward()  # and both are differentiable graphs


def test_forward_features_rejects_a_model_without_a_feature_tap():
    with pytest.raises(TypeError, match="features"):
        forward_features(torch.nn.Linear(4, 2), torch.rand(1, 4))


@pytest.mark.parametrize(
    ("arch", "low", "high"),
    [
        # published counts at 10 classes: ResNet-18 (CIFAR stem) 11.17M, PreAct-ResNet-18 11.17M,
        # WRN-34-10 46.16M (RobustBench Zhang2019Theoretically, without TRADES's unused
        # sub_block1), MobileNetV2 2.24M (torchvision; 2.30M with kuangliu's conv shortcuts)
        ("resnet18", 11.1e6, 11.3e6),
        ("preact_resnet18", 11.1e6, 11.3e6),
        ("wrn34_10", 46.0e6, 46.3e6),
        ("mobilenetv2", 2.2e6, 2.3e6),
    ],
)
def test_parameter_counts_are_the_published_ones(arch, low, high):
    assert low <= _n_params(_built(arch, 3, 10)) <= high


def test_mobilenetv2_has_torchvisions_parameters_and_cifar_resolution():
    """Same layers as torchvision's mobilenet_v2 (only strides differ, which own no weights),
    and a 32x32 input reaches the last stage at 4x4 rather than 1x1."""
    tv = pytest.importorskip("torchvision")
    ours = _built("mobilenetv2", 3, 10)
    assert _n_params(ours) == _n_params(tv.models.mobilenet_v2(num_classes=10))
    seen = []
    hook = ours[1].layers[-1].register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    with torch.no_grad():
        ours(torch.rand(1, 3, 32, 32))
    hook.remove()
    assert seen == [(1, 1280, 4, 4)]


def test_small_cnn_keeps_its_layers_and_parameter_count():
    """The class form of small_cnn computes what the plain Sequential did: same modules, same
    count (3x3 convs 1->32->32, pool, 32->64->64, BN after each, Linear 64->C)."""
    m = _built("small_cnn", 1, 10)
    convs = 9 * (1 * 32 + 32 * 32 + 32 * 64 + 64 * 64)
    bns = 2 * (32 + 32 + 64 + 64)
    assert _n_params(m) == convs + bns + 64 * 10 + 10
    assert isinstance(m[1][0], torch.nn.Sequential)  # body[0] is still the first conv block


def test_split_sizes_are_the_sizes_load_splits_makes_and_refit_trains_on_train_plus_val():
    from sweep.data import DATASETS, load_splits, split_sizes

    s = load_splits("digits", val_fraction=0.15, test_fraction=0.25)
    sizes = split_sizes(DATASETS.get("digits"), 0.15, 0.25)
    assert sizes == {"train": len(s.x_train), "val": len(s.x_val), "test": len(s.x_test)}
    r = s.refit()
    assert len(r.x_train) == sizes["train"] + sizes["val"] and len(r.x_val) == 0
    assert torch.equal(r.x_train[len(s.x_train) :], s.x_val)
    assert torch.equal(r.x_test, s.x_test)
