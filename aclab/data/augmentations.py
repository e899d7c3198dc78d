"""Image augmentations of DrAC / UCB-DrAC on Procgen (Raileanu et al. 2021), as pure functions.

Every augmentation works on a float image batch ``x [N, C, H, W]`` with values in ``[0, 1]`` (uint8 frames
divided by 255) and comes in two parts:

* ``sample_<name>(n, h, w, generator) -> params``: the random parameters of ``n`` images, drawn from an
  explicit ``torch.Generator`` (so training is reproducible and resumes exactly);
* ``<name>(x, params) -> x_aug``: a deterministic function of the images and those parameters (what the
  tests compare with slow per-image references).

:data:`AUGMENTATIONS` maps each name of the paper's Procgen set to ``fn(x, generator) -> x_aug`` that draws
fresh parameters per image on every call (the authors' code redraws them after every minibatch), in the
order of the authors' code (which is also the UCB bandit's arm order): crop, random-conv, grayscale, flip,
rotate, cutout, cutout-color, color-jitter. The parameter ranges follow the authors' code (itself after
RAD, Laskin et al. 2020); the notes per function say where it differs from a reading of the name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as kornia's rgb_to_grayscale


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


# ----------------------------------------------------------------------------------------------- crop
def sample_crop(n: int, h: int, w: int, generator: torch.Generator, pad: int = 12) -> Tensor:
    """Top-left corners ``[n, 2]`` (row, col), each uniform in ``[0, 2 * pad]``."""
    return torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=generator.device)


def crop(x: Tensor, corners: Tensor, pad: int = 12) -> Tensor:
    """Replicate-pad by ``pad`` pixels and crop back to ``H x W`` at ``corners [N, 2]`` (a random shift)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    rows = corners[:, 0, None] + torch.arange(h, device=x.device)  # [N, H]
    cols = corners[:, 1, None] + torch.arange(w, device=x.device)  # [N, W]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channels, rows[:, None, :, None], cols[:, None, None, :]]


# ----------------------------------------------------------------------------------------------- random conv
def sample_random_conv(n: int, channels: int, generator: torch.Generator) -> Tensor:
    """One 3x3 kernel per image, ``[n, C, C, 3, 3]``, Xavier-normal (std ``sqrt(2 / (fan_in + fan_out))``,
    fan = ``C * 9``), as the authors' per-image ``xavier_normal_`` re-initialisation."""
    std = math.sqrt(2.0 / (2 * channels * 9))
    return std * torch.randn((n, channels, channels, 3, 3), generator=generator, device=generator.device)


def random_conv(x: Tensor, kernels: Tensor) -> Tensor:
    """Each image convolved with its own kernel ``kernels[i] [C, C, 3, 3]`` (zero padding 1, no bias, no
    clamping: the output may leave [0, 1] as in the authors' code). One grouped convolution."""
    n, c, h, w = x.shape
    out = F.conv2d(x.reshape(1, n * c, h, w), kernels.reshape(n * c, c, 3, 3), padding=1, groups=n)
    return out.reshape(n, c, h, w)


# ----------------------------------------------------------------------------------------------- grayscale
def grayscale(x: Tensor) -> Tensor:
    """Luma ``0.299 R + 0.587 G + 0.114 B`` repeated over the three channels."""
    weights = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True).expand_as(x).contiguous()


# ----------------------------------------------------------------------------------------------- flip
def sample_flip(n: int, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Which images to flip: bool ``[n]``, each True with probability ``p``."""
    return torch.rand(n, generator=generator, device=generator.device) < p


def flip(x: Tensor, which: Tensor) -> Tensor:
    """Flip the chosen images upside down (along the height axis: the authors' code flips axis 2 of NCHW)."""
    return torch.where(which.view(-1, 1, 1, 1), x.flip(2), x)


# ----------------------------------------------------------------------------------------------- rotate
def sample_rotate(n: int, generator: torch.Generator) -> Tensor:
    """Quarter turns per image, int64 ``[n]`` uniform in {0, 1, 2, 3}."""
    return torch.randint(0, 4, (n,), generator=generator, device=generator.device)


def rotate(x: Tensor, turns: Tensor) -> Tensor:
    """Rotate each image by ``turns[i]`` quarter turns (``torch.rot90`` over (H, W); square images)."""
    out = x
    for k in (1, 2, 3):
        out = torch.where((turns == k).view(-1, 1, 1, 1), torch.rot90(x, k, dims=(2, 3)), out)
    return out


# ----------------------------------------------------------------------------------------------- cutout
def sample_cutout(n: int, generator: torch.Generator, box_min: int = 7, box_max: int = 22) -> Tensor:
    """Box sizes ``[n, 2]`` (height, width), each uniform in ``[box_min, box_max)``."""
    return torch.randint(box_min, box_max, (n, 2), generator=generator, device=generator.device)


def cutout_mask(sizes: Tensor, h: int, w: int, pivot_h: int = 12, pivot_w: int = 24) -> Tensor:
    """bool ``[N, 1, H, W]``: rows ``[pivot_h + bh, pivot_h + 2 bh)`` x columns ``[pivot_w + bw, pivot_w + 2 bw)``
    of each image (the authors' box placement; parts outside the image are dropped)."""
    rows = torch.arange(h, device=sizes.device).view(1, h, 1)
    cols = torch.arange(w, device=sizes.device).view(1, 1, w)
    bh, bw = sizes[:, 0].view(-1, 1, 1), sizes[:, 1].view(-1, 1, 1)
    inside = (rows >= pivot_h + bh) & (rows < pivot_h + 2 * bh) & (cols >= pivot_w + bw) & (cols < pivot_w + 2 * bw)
    return inside.unsqueeze(1)


def cutout(x: Tensor, sizes: Tensor) -> Tensor:
    """Set each image's box (:func:`cutout_mask`) to black."""
    return x.masked_fill(cutout_mask(sizes, x.shape[2], x.shape[3]), 0.0)


def sample_cutout_color(n: int, generator: torch.Generator, channels: int = 3) -> tuple[Tensor, Tensor]:
    """Box sizes as :func:`sample_cutout` and one colour per image ``[n, C]`` in {0, ..., 254} / 255.

    (The authors' code redraws the colours without the division by 255 after the first minibatch, which
    paints boxes of value up to 254 into [0, 1] images; we keep the colours in [0, 1].)
    """
    sizes = sample_cutout(n, generator)
    colors = torch.randint(0, 255, (n, channels), generator=generator, device=generator.device) / 255.0
    return sizes, colors


def cutout_color(x: Tensor, sizes: Tensor, colors: Tensor) -> Tensor:
    """Paint each image's box (:func:`cutout_mask`) with its colour ``colors [N, C]``."""
    mask = cutout_mask(sizes, x.shape[2], x.shape[3])
    return torch.where(mask, colors.to(x.dtype).view(*colors.shape, 1, 1), x)


# ----------------------------------------------------------------------------------------------- colour jitter
def rgb_to_hsv(rgb: Tensor, eps: float = 1e-8) -> Tensor:
    """``[N, 3, H, W]`` RGB in [0, 1] -> HSV with hue, saturation and value all in [0, 1] (hue in turns)."""
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    cmax, argmax = rgb.max(dim=1)
    cmin = rgb.min(dim=1).values
    delta = cmax - cmin
    hue_r = torch.remainder((g - b) / (delta + eps), 6.0)
    hue_g = (b - r) / (delta + eps) + 2.0
    hue_b = (r - g) / (delta + eps) + 4.0
    hue = torch.where(argmax == 0, hue_r, torch.where(argmax == 1, hue_g, hue_b))
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
    saturation = torch.where(cmax > 0, delta / (cmax + eps), torch.zeros_like(cmax))
    return torch.stack([hue, saturation, cmax], dim=1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv` (inputs clamped to [0, 1]); output clamped to [0, 1]."""
    hsv = hsv.clamp(0.0, 1.0)
    h, s, v = hsv[:, 0] * 6.0, hsv[:, 1], hsv[:, 2]
    c = v * s
    x = c * (1.0 - torch.abs(torch.remainder(h, 2.0) - 1.0))
    zero = torch.zeros_like(c)
    sector = torch.floor(h).clamp(0, 5).long()
    table = [(c, x, zero), (x, c, zero), (zero, c, x), (zero, x, c), (x, zero, c), (c, zero, x)]
    rgb = [torch.zeros_like(c) for _ in range(3)]
    for k, parts in enumerate(table):
        here = sector == k
        for i in range(3):
            rgb[i] = torch.where(here, parts[i], rgb[i])
    m = v - c
    return (torch.stack(rgb, dim=1) + m.unsqueeze(1)).clamp(0.0, 1.0)


def sample_color_jitter(n: int, generator: torch.Generator, brightness: float = 0.4, contrast: float = 0.4,
                        saturation: float = 0.4, hue: float = 0.5) -> dict[str, Tensor]:
    """Per-image factors (brightness, contrast, saturation uniform in ``[1 - b, 1 + b]``, hue shift uniform in
    ``[-hue, hue]``) and one coin for the order (True: contrast first), as the authors' code."""
    return {
        "brightness": _uniform(n, max(1 - brightness, 0.0), 1 + brightness, generator),
        "contrast": _uniform(n, max(1 - contrast, 0.0), 1 + contrast, generator),
        "saturation": _uniform(n, max(1 - saturation, 0.0), 1 + saturation, generator),
        "hue": _uniform(n, -hue, hue, generator),
        "contrast_first": torch.rand((), generator=generator, device=generator.device) >= 0.5,
    }


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """``clamp((x - mean) * factor + mean, 0, 1)`` with the per-image, per-channel mean over pixels."""
    means = x.mean(dim=(2, 3), keepdim=True)
    return ((x - means) * factor.view(-1, 1, 1, 1) + means).clamp(0.0, 1.0)


def adjust_hsv(x: Tensor, brightness: Tensor, hue: Tensor, saturation: Tensor) -> Tensor:
    """In HSV: value times ``brightness``, hue plus ``hue * 255 / 360`` turns (mod 1; the authors' scaling),
    saturation times ``saturation`` (each clamped to [0, 1]); back to RGB."""
    hsv = rgb_to_hsv(x)
    v = (hsv[:, 2] * brightness.view(-1, 1, 1)).clamp(0.0, 1.0)
    h = torch.remainder(hsv[:, 0] + hue.view(-1, 1, 1) * 255.0 / 360.0, 1.0)
    s = (hsv[:, 1] * saturation.view(-1, 1, 1)).clamp(0.0, 1.0)
    return hsv_to_rgb(torch.stack([h, s, v], dim=1))


def color_jitter(x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """Contrast and the HSV adjustments (brightness, hue, saturation), in the order ``params`` chose."""
    if bool(params["contrast_first"]):
        x = adjust_contrast(x, params["contrast"])
        return adjust_hsv(x, params["brightness"], params["hue"], params["saturation"])
    x = adjust_hsv(x, params["brightness"], params["hue"], params["saturation"])
    return adjust_contrast(x, params["contrast"])


# ----------------------------------------------------------------------------------------------- registry
Augmentation = Callable[[Tensor, torch.Generator], Tensor]


def _random(name: str) -> Augmentation:
    def apply(x: Tensor, generator: torch.Generator) -> Tensor:
        n, c, h, w = x.shape
        if name == "crop":
            return crop(x, sample_crop(n, h, w, generator))
        if name == "random-conv":
            return random_conv(x, sample_random_conv(n, c, generator).to(x.dtype))
        if name == "grayscale":
            return grayscale(x)
        if name == "flip":
            return flip(x, sample_flip(n, generator))
        if name == "rotate":
            return rotate(x, sample_rotate(n, generator))
        if name == "cutout":
            return cutout(x, sample_cutout(n, generator))
        if name == "cutout-color":
            return cutout_color(x, *sample_cutout_color(n, generator, c))
        return color_jitter(x, sample_color_jitter(n, generator))

    apply.__name__ = name.replace("-", "_")
    return apply


AUGMENTATION_NAMES = ("crop", "random-conv", "grayscale", "flip", "rotate", "cutout", "cutout-color", "color-jitter")
AUGMENTATIONS: dict[str, Augmentation] = {name: _random(name) for name in AUGMENTATION_NAMES}


def to_unit_float(obs: Tensor) -> Tensor:
    """uint8 frames -> float32 in [0, 1]; float observations unchanged."""
    return obs.to(torch.float32) / 255.0 if obs.dtype == torch.uint8 else obs
