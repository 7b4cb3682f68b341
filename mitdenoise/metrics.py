"""PSNR and SSIM as the denoising papers compute them (KAIR / BasicSR conventions).

- Images are (H, W, C) or (H, W) arrays; uint8 has a data range of 255, uint16 of
  65535, float of 1.0 (pass ``data_range`` to override).
- ``crop_border`` drops that many pixels on every side first.
- ``y_channel=True`` compares the Y of YCbCr (ITU-R BT.601, studio range), the way
  BasicSR's ``rgb2ycbcr(img, y_only=True)`` does on RGB in [0, 1]:
  ``Y = 65.481 R + 128.553 G + 24.966 B + 16`` (in [16, 235]), unrounded, with a
  peak of 255. (The authors' test script does the same on BGR arrays.)
- SSIM is Wang et al. 2004: 11x11 Gaussian window with sigma 1.5, K1 = 0.01,
  K2 = 0.03, population (co)variances, the SSIM map over the 'valid' region only
  (5 pixels lost on each side), averaged over the map and then over channels,
  like BasicSR's ``calculate_ssim`` and scikit-image's ``structural_similarity``
  with ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``.

Computed in float64 with NumPy only.
"""

from __future__ import annotations

import math

import numpy as np

YCBCR_Y_WEIGHTS = np.array([65.481, 128.553, 24.966])
"""BT.601 Y from RGB in [0, 1], on the 0..255 scale (plus 16)."""
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def default_data_range(dtype: np.dtype) -> float:
    """255 for uint8, 65535 for uint16, the dtype's max for other integers, 1.0 for floats."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        return float(np.iinfo(dtype).max)
    return 1.0


def _prepare(a, b, crop_border: int, y_channel: bool, data_range: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    """Both images as float64 (H, W, C), cropped, optionally reduced to Y; and their peak value."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected (H, W) or (H, W, C) images, got shape {a.shape}")
    peak = float(data_range) if data_range is not None else default_data_range(a.dtype)
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border:
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
        if a.size == 0:
            raise ValueError(f"crop_border {crop_border} leaves nothing of a {a.shape} image")
    a, b = a.astype(np.float64), b.astype(np.float64)
    if y_channel and a.shape[2] == 3:
        a, b = rgb_to_y(a / peak)[..., None], rgb_to_y(b / peak)[..., None]
        peak = 255.0
    elif y_channel and a.shape[2] != 1:
        raise ValueError(f"y_channel needs RGB (or single-channel) images, got {a.shape[2]} channels")
    return a, b, peak


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB in [0, 1] -> (H, W) BT.601 luma on the 16..235 scale (not rounded)."""
    return np.asarray(rgb, np.float64) @ YCBCR_Y_WEIGHTS + 16.0


def psnr(a, b, *, crop_border: int = 0, y_channel: bool = False, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels; inf if the images are equal."""
    x, y, peak = _prepare(a, b, crop_border, y_channel, data_range)
    mse = float(np.mean((x - y) ** 2))
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


def gaussian_window(sigma: float = SSIM_SIGMA, radius: int = SSIM_RADIUS) -> np.ndarray:
    """Normalised 1-D Gaussian taps, ``2 radius + 1`` of them."""
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-(t * t) / (2.0 * sigma * sigma))
    return w / w.sum()


def _filter_valid(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of (H, W, C) with ``taps`` along H and W."""
    k = len(taps)
    h, w = img.shape[:2]
    rows = sum(taps[i] * img[i : h - k + 1 + i] for i in range(k))
    return sum(taps[i] * rows[:, i : w - k + 1 + i] for i in range(k))


def ssim(a, b, *, crop_border: int = 0, y_channel: bool = False, data_range: float | None = None) -> float:
    """Mean structural similarity (per channel, then averaged over channels)."""
    x, y, peak = _prepare(a, b, crop_border, y_channel, data_range)
    size = 2 * SSIM_RADIUS + 1
    if x.shape[0] < size or x.shape[1] < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, got {x.shape[0]}x{x.shape[1]}")
    c1 = (SSIM_K1 * peak) ** 2
    c2 = (SSIM_K2 * peak) ** 2
    taps = gaussian_window()
    mu_x = _filter_valid(x, taps)
    mu_y = _filter_valid(y, taps)
    xx = _filter_valid(x * x, taps) - mu_x * mu_x
    yy = _filter_valid(y * y, taps) - mu_y * mu_y
    xy = _filter_valid(x * y, taps) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * xy + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (xx + yy + c2))
    return float(ssim_map.mean(axis=(0, 1)).mean())
