"""DrAC's Procgen augmentations (aclab.data.augmentations): each deterministic part against a slow per-image
reference (NumPy loops, Python's colorsys), the parameter draws' ranges, and the registry's contract."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch

from aclab.data import augmentations as aug


def _images(n=5, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, h, w), generator=g)


def test_crop_is_a_shift_of_the_replicate_padded_image():
    x = _images()
    corners = torch.tensor([[0, 0], [24, 24], [12, 12], [3, 20], [24, 0]])
    out = aug.crop(x, corners)
    xn = x.numpy()
    for i, (r, c) in enumerate(corners.tolist()):
        padded = np.pad(xn[i], ((0, 0), (12, 12), (12, 12)), mode="edge")
        np.testing.assert_array_equal(out[i].numpy(), padded[:, r:r + 16, c:c + 16])
    assert torch.equal(out[2], x[2])  # corner (pad, pad) is the identity


def test_random_conv_uses_each_images_own_kernel():
    x = _images()
    kernels = aug.sample_random_conv(5, 3, torch.Generator().manual_seed(1))
    out = aug.random_conv(x, kernels)
    xp = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))
    k = kernels.numpy()
    ref = np.zeros_like(x.numpy())
    for i in range(5):
        for o in range(3):
            for dy in range(3):
                for dx in range(3):
                    ref[i, o] += np.einsum("chw,c->hw", xp[i, :, dy:dy + 16, dx:dx + 16], k[i, o, :, dy, dx])
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)
    big = aug.sample_random_conv(4000, 3, torch.Generator().manual_seed(2))
    assert abs(big.std().item() - (2 / 54) ** 0.5) < 0.005  # Xavier normal, fan_in = fan_out = 27


def test_grayscale_flip_rotate_cutout_against_loops():
    x = _images()
    xn = x.numpy()
    gray = aug.grayscale(x).numpy()
    for i in range(5):
        luma = 0.299 * xn[i, 0] + 0.587 * xn[i, 1] + 0.114 * xn[i, 2]
        for ch in range(3):
            np.testing.assert_allclose(gray[i, ch], luma, rtol=1e-6)
    which = torch.tensor([True, False, True, False, False])
    flipped = aug.flip(x, which).numpy()
    for i in range(5):
        np.testing.assert_array_equal(flipped[i], xn[i, :, ::-1, :] if which[i] else xn[i])
    turns = torch.tensor([0, 1, 2, 3, 1])
    rotated = aug.rotate(x, turns).numpy()
    for i in range(5):
        np.testing.assert_array_equal(rotated[i], np.rot90(xn[i], k=int(turns[i]), axes=(1, 2)))
    y = _images(n=3, h=64, w=64)
    sizes = torch.tensor([[7, 7], [21, 21], [10, 15]])
    cut = aug.cutout(y, sizes).numpy()
    colors = torch.tensor([[0.1, 0.5, 0.9], [1.0, 0.0, 0.2], [0.3, 0.3, 0.3]])
    painted = aug.cutout_color(y, sizes, colors).numpy()
    for i, (bh, bw) in enumerate(sizes.tolist()):
        ref = y[i].numpy().copy()
        ref[:, 12 + bh:12 + 2 * bh, 24 + bw:24 + 2 * bw] = 0.0
        np.testing.assert_array_equal(cut[i], ref)
        ref = y[i].numpy().copy()
        ref[:, 12 + bh:12 + 2 * bh, 24 + bw:24 + 2 * bw] = colors[i].numpy()[:, None, None]
        np.testing.assert_allclose(painted[i], ref)
        assert (cut[i] == 0).any(axis=0).sum() > 0


def test_hsv_round_trip_and_colorsys():
    x = _images(n=2, h=8, w=8)
    hsv = aug.rgb_to_hsv(x)
    for i in range(2):
        for r in range(8):
            for c in range(8):
                ref = colorsys.rgb_to_hsv(*x[i, :, r, c].tolist())
                np.testing.assert_allclose(hsv[i, :, r, c].numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(aug.hsv_to_rgb(hsv).numpy(), x.numpy(), atol=1e-5)
    gray = torch.full((1, 3, 2, 2), 0.5)
    assert torch.equal(aug.rgb_to_hsv(gray)[:, :2], torch.zeros(1, 2, 2, 2))


def test_color_jitter_against_colorsys_reference():
    x = _images(n=3, h=4, w=4)
    params = aug.sample_color_jitter(3, torch.Generator().manual_seed(3))
    for contrast_first in (True, False):
        params["contrast_first"] = torch.tensor(contrast_first)
        out = aug.color_jitter(x, params).numpy()
        for i in range(3):
            img = x[i].numpy().copy()

            def contrast(im, i=i):
                mean = im.mean(axis=(1, 2), keepdims=True)
                return np.clip((im - mean) * params["contrast"][i].item() + mean, 0, 1)

            def hsv_ops(im, i=i):
                res = np.empty_like(im)
                for r in range(4):
                    for c in range(4):
                        h, s, v = colorsys.rgb_to_hsv(*im[:, r, c])
                        v = min(max(v * params["brightness"][i].item(), 0), 1)
                        h = (h + params["hue"][i].item() * 255 / 360) % 1.0
                        s = min(max(s * params["saturation"][i].item(), 0), 1)
                        res[:, r, c] = colorsys.hsv_to_rgb(h, s, v)
                return res

            ref = hsv_ops(contrast(img)) if contrast_first else contrast(hsv_ops(img))
            np.testing.assert_allclose(out[i], ref, atol=1e-4)


def test_parameter_ranges():
    g = torch.Generator().manual_seed(0)
    corners = aug.sample_crop(2000, 64, 64, g)
    assert corners.min() == 0 and corners.max() == 24
    sizes = aug.sample_cutout(2000, g)
    assert sizes.min() == 7 and sizes.max() == 21
    assert 0.45 < aug.sample_flip(4000, g).float().mean() < 0.55
    assert set(aug.sample_rotate(400, g).tolist()) == {0, 1, 2, 3}
    _, colors = aug.sample_cutout_color(500, g)
    assert colors.min() >= 0 and colors.max() <= 254 / 255
    p = aug.sample_color_jitter(2000, g)
    assert 0.6 <= p["brightness"].min() and p["brightness"].max() <= 1.4
    assert -0.5 <= p["hue"].min() and p["hue"].max() <= 0.5 and p["hue"].min() < -0.45


@pytest.mark.parametrize("name", aug.AUGMENTATION_NAMES)
def test_registry_draws_fresh_reproducible_parameters(name):
    x = _images(n=6, h=64, w=64)
    a = aug.AUGMENTATIONS[name](x, torch.Generator().manual_seed(5))
    b = aug.AUGMENTATIONS[name](x, torch.Generator().manual_seed(5))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b)
    if name != "grayscale":
        g = torch.Generator().manual_seed(5)
        first, second = aug.AUGMENTATIONS[name](x, g), aug.AUGMENTATIONS[name](x, g)
        assert not torch.equal(first, second)
    assert not torch.equal(a, x)
    assert tuple(aug.AUGMENTATIONS) == ("crop", "random-conv", "grayscale", "flip", "rotate", "cutout",
                                         "cutout-color", "color-jitter")
