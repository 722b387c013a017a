"""`data.augment` for in-memory images: random augmentation as tensor ops on the training device.

A training batch of float images in [0, 1], (N, C, H, W), is augmented on whatever device it lives
on; every random number is drawn on the CPU from a generator seeded by where the batch stands in its
stream (stream seed, epoch, position), so a sample gets the same augmentation on a CPU and on a GPU,
a run is reproducible from its seed, and a resumed run draws exactly what the uninterrupted one drew
(the stream's position is in the checkpoint already).

Levels:

- `none`: the images as stored.
- `weak`: a random translation of up to 1/8 of the image size in each direction (FixMatch's weak
  view, without the horizontal flip that would turn digits into other shapes).
- `strong`: the weak translation, then two operations per sample drawn from RandAugment's list
  (Cubuk et al., 2020) at a random magnitude each (as FixMatch draws them), then Cutout (a grey
  square of up to half the image side). The list: identity, autocontrast, brightness, colour
  (saturation), contrast, posterize, sharpness, solarize, rotate, shear x / y, translate x / y.
  RandAugment's equalize is left out (a per-image histogram has no cheap batched form).

Geometric operations are composed into one affine map per sample and applied first, by one
`grid_sample` (bilinear, edges replicated); each colour operation then runs on the samples that drew it.

`data.invert` (a probability, any level): each image's colours are inverted (x -> 1 - x) with that
probability, after the level's operations. CTAugment, the policy of FixMatch's and AdaMatch's papers,
lists the same operation; it teaches a network that a digit may be darker than its background, which a
source of light strokes on black never shows (MNIST -> MNIST-M: a third of the target's digits are
darker than the photo behind them). With `data.invert_channels` each channel draws its own inversion,
so a stroke may be lighter than the background in one channel and darker in another, as in 14 % of
MNIST-M's test digits: a network that learnt to add up the channels of grey digits cancels such a
stroke out.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

LEVELS = ("none", "weak", "strong")
WEAK_SHIFT = 0.125  # largest translation of `weak`, as a fraction of the image size

# RandAugment's operations, by index; a sample draws two of them with a magnitude m in [0, 1] each.
OPERATIONS = ("identity", "autocontrast", "brightness", "color", "contrast", "posterize", "sharpness",
              "solarize", "rotate", "shear_x", "shear_y", "translate_x", "translate_y")
OPS_PER_SAMPLE = 2
MAX_ROTATION_DEG = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATION = 0.3  # fraction of the image size
MAX_ENHANCE = 0.9      # brightness / colour / contrast / sharpness factors lie in [1 - 0.9, 1 + 0.9]
MAX_CUTOUT = 0.5       # largest Cutout side, as a fraction of the image side


@dataclass(frozen=True)
class Inversion:
    """`data.invert` (the probability of inverting an image's colours) and `data.invert_channels`
    (true: each channel draws its own inversion). False when it never inverts."""

    probability: float = 0.0
    per_channel: bool = False

    def __bool__(self) -> bool:
        return self.probability > 0

    @classmethod
    def from_config(cls, data_cfg) -> "Inversion":
        return cls(float(data_cfg.get("invert") or 0.0), bool(data_cfg.get("invert_channels", False)))


NO_INVERSION = Inversion()


def batch_seed(stream_seed: int, epoch: int, position: int, view: int = 0) -> int:
    """The seed of the augmentation of the batch that starts at `position` of epoch `epoch` (`view`:
    which of several augmented views of the same batch)."""
    entropy = [stream_seed % 2**64, epoch, position, 0xA06, view]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise ValueError(f"augmentation level must be one of {', '.join(LEVELS)}, got {level!r}")
    return level


def augment(x: torch.Tensor, level: str, seed: int, invert: Inversion = NO_INVERSION) -> torch.Tensor:
    """Augment float images `x` (N, C, H, W) in [0, 1] at `level`, then invert the colours of each
    image (or each channel) with `invert`'s probability; the result stays in [0, 1]."""
    if check_level(level) == "none" and not invert:
        return x
    # Every draw happens on the CPU, in a fixed order: the same numbers on any device. The inversion
    # draws last, so without it every other draw of a seed is what it was.
    generator = torch.Generator().manual_seed(seed)
    if level != "none":
        x = _augment_level(x, level, generator)
    if invert:
        draws = torch.rand(len(x), x.shape[1] if invert.per_channel else 1, generator=generator)
        inverted = (draws < invert.probability).view(len(x), -1, 1, 1).to(x.device)
        x = torch.where(inverted, 1.0 - x, x)
    return x


def _augment_level(x: torch.Tensor, level: str, generator: torch.Generator) -> torch.Tensor:
    """`weak` or `strong` (the module docstring), drawing from `generator`."""
    n = len(x)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * WEAK_SHIFT
    if level == "weak":
        return apply_affine(x, affine_matrices(n, shift=shift))
    ops = torch.randint(len(OPERATIONS), (n, OPS_PER_SAMPLE), generator=generator)
    magnitude = torch.rand(n, OPS_PER_SAMPLE, generator=generator)
    sign = torch.where(torch.rand(n, OPS_PER_SAMPLE, generator=generator) < 0.5, -1.0, 1.0)
    cutout_center = torch.rand(n, 2, generator=generator)
    cutout_side = torch.rand(n, generator=generator) * MAX_CUTOUT

    signed = magnitude * sign
    angle, shear, extra_shift = torch.zeros(n), torch.zeros(n, 2), torch.zeros(n, 2)
    for k in range(OPS_PER_SAMPLE):
        def chosen(name):
            return ops[:, k] == OPERATIONS.index(name)
        angle = angle + torch.where(chosen("rotate"), signed[:, k] * MAX_ROTATION_DEG, 0.0)
        shear[:, 0] += torch.where(chosen("shear_x"), signed[:, k] * MAX_SHEAR, 0.0)
        shear[:, 1] += torch.where(chosen("shear_y"), signed[:, k] * MAX_SHEAR, 0.0)
        extra_shift[:, 0] += torch.where(chosen("translate_x"), signed[:, k] * MAX_TRANSLATION, 0.0)
        extra_shift[:, 1] += torch.where(chosen("translate_y"), signed[:, k] * MAX_TRANSLATION, 0.0)

    # The geometric part first (a new tensor), then each colour operation on the samples that drew it
    # (their indices are known on the CPU: no device synchronisation), then Cutout.
    x = apply_affine(x, affine_matrices(n, shift=shift + extra_shift, angle_deg=angle, shear=shear))
    device = x.device
    factor = 1.0 + signed * MAX_ENHANCE
    for k in range(OPS_PER_SAMPLE):
        for name, op in COLOR_OPERATIONS.items():
            rows = (ops[:, k] == OPERATIONS.index(name)).nonzero().squeeze(1)
            if len(rows):
                on_device = rows.to(device)
                x[on_device] = op(x[on_device], magnitude[rows, k].to(device), factor[rows, k].to(device))
    return cutout(x, cutout_center.to(device), cutout_side.to(device))


def affine_matrices(n: int, shift: torch.Tensor, angle_deg: torch.Tensor | None = None,
                    shear: torch.Tensor | None = None) -> torch.Tensor:
    """(n, 2, 3) matrices for `F.affine_grid` (normalised coordinates in [-1, 1]): output pixel p
    reads the input at A p + t, i.e. the image is rotated by -angle, sheared, and moved by -shift
    (shift: fractions of the size, so 1 is the whole image)."""
    angle = torch.zeros(n) if angle_deg is None else angle_deg * (math.pi / 180)
    shear = torch.zeros(n, 2) if shear is None else shear
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    shearing = torch.eye(2).repeat(n, 1, 1)
    shearing[:, 0, 1] = shear[:, 0]
    shearing[:, 1, 0] = shear[:, 1]
    linear = rotation @ shearing
    return torch.cat([linear, (2 * shift).unsqueeze(2)], dim=2)


def apply_affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample each image of `x` through its matrix of `theta` (bilinear, edges replicated)."""
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def cutout(x: torch.Tensor, center: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """Grey (0.5) squares: sample i's of side side[i] (fraction of the image) centred at center[i]
    (fractions of width, height), clipped at the borders."""
    _, _, h, w = x.shape
    rows = (torch.arange(h, device=x.device) + 0.5) / h
    cols = (torch.arange(w, device=x.device) + 0.5) / w
    half = (side / 2).view(-1, 1, 1)
    inside = ((rows.view(1, -1, 1) - center[:, 1].view(-1, 1, 1)).abs() < half) & \
             ((cols.view(1, 1, -1) - center[:, 0].view(-1, 1, 1)).abs() < half)
    return torch.where(inside.unsqueeze(1), torch.full_like(x, 0.5), x)


def _luma(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:  # ITU-R 601, as PIL's convert("L")
        return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    return x.mean(1, keepdim=True)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: b + factor * (a - b), clipped; factor 1 gives a back."""
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp(0, 1)


def _autocontrast(x, magnitude, factor):
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    return torch.where(high > low, (x - low) / (high - low).clamp_min(1e-6), x)


def _brightness(x, magnitude, factor):
    return _blend(x, torch.zeros_like(x), factor)


def _color(x, magnitude, factor):
    return _blend(x, _luma(x).expand_as(x), factor)


def _contrast(x, magnitude, factor):
    return _blend(x, _luma(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), factor)


def _posterize(x, magnitude, factor):
    bits = (8 - torch.round(magnitude * 4)).view(-1, 1, 1, 1)  # keep 8 .. 4 bits
    step = torch.pow(2.0, 8 - bits)
    return torch.floor(torch.round(x * 255) / step) * step / 255


def _sharpness(x, magnitude, factor):
    # PIL's SMOOTH kernel; the result mixes image and smoothed image, so factor > 1 sharpens.
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device, dtype=x.dtype) / 13
    channels = x.shape[1]
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(channels, 1, 3, 3), groups=channels)
    return _blend(x, smooth, factor)


def _solarize(x, magnitude, factor):
    threshold = (1.0 - magnitude).view(-1, 1, 1, 1)  # magnitude 0: nothing inverted
    return torch.where(x > threshold, 1.0 - x, x)


COLOR_OPERATIONS = {"autocontrast": _autocontrast, "brightness": _brightness, "color": _color,
                    "contrast": _contrast, "posterize": _posterize, "sharpness": _sharpness,
                    "solarize": _solarize}
