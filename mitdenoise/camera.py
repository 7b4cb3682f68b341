"""A camera's noise, synthesised: an sRGB image taken back to a raw mosaic, noise added there, and
the mosaic developed again as a camera would.

Real photos carry noise that is neither white nor Gaussian in sRGB: the sensor adds shot noise
(variance growing with the light) and read noise on a linear, mosaicked raw image, and the camera
then white-balances, demosaics (which correlates neighbours), applies a colour matrix (which mixes
and amplifies the channels' noise), a tone curve (which stretches the shadows' noise), and often
JPEG (which removes fine noise and leaves 8x8-block and chroma-subsampled blotches). Following
Brooks et al., "Unprocessing Images for Learned Raw Denoising" (CVPR 2019):

1. sRGB -> linear: the inverse of a smoothstep tone curve, then the inverse of a 2.2 gamma;
2. linear sRGB -> camera RGB: the inverse of a colour matrix drawn as a random convex combination
   of four real cameras' XYZ -> camera matrices (``XYZ_TO_CAMERA``);
3. the white balance and brightness gains undone (drawn from real cameras' ranges), sparing the
   highlights so they don't turn grey;
4. an RGGB mosaic;
5. shot and read noise: variance ``shot * signal + read``, with ``log(read)`` tied to ``log(shot)``
   by the line Brooks et al. fitted to real sensors' calibrations, plus a random spread;
6. develop: gains, demosaic (Malvar-He-Cutler or bilinear, drawn), colour matrix, gamma, tone
   curve, 8-bit, and JPEG at a drawn quality (or none).

:func:`camera_pair` returns the noisy image and its *clean twin*: the same pipeline and the same
draws (JPEG included) without the noise, so that PSNR against the twin measures the noise, not
the demosaicking's softening or the JPEG's blocks.

The level is the sensor noise's standard deviation (0..255 scale) on a raw value of
``RAW_REFERENCE`` (a mid-grey): 1 is a base-ISO DSLR's light noise; 10-15 a phone indoors; 30+
a phone at night. See docs/benchmarks.md for the PSNR each level gives on the test sets.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

#: Linear sRGB (D65) to CIE XYZ.
RGB_TO_XYZ = np.array([
    [0.4124564, 0.3575761, 0.1804375],
    [0.2126729, 0.7151522, 0.0721750],
    [0.0193339, 0.1191920, 0.9503041],
])
#: XYZ -> camera matrices of four real cameras, the set Brooks et al. (CVPR 2019) draw from.
XYZ_TO_CAMERA = np.array([
    [[1.0234, -0.2969, -0.2266], [-0.5625, 1.6328, -0.0469], [-0.0703, 0.2188, 0.6406]],
    [[0.4913, -0.0541, -0.0202], [-0.6130, 1.3513, 0.2906], [-0.1564, 0.2151, 0.7183]],
    [[0.8380, -0.2630, -0.0639], [-0.2887, 1.0725, 0.2496], [-0.0627, 0.1427, 0.5438]],
    [[0.6596, -0.2079, -0.0562], [-0.4782, 1.3016, 0.1933], [-0.0970, 0.1581, 0.5181]],
])
RED_GAIN = (1.9, 2.4)
BLUE_GAIN = (1.5, 1.9)
BRIGHTNESS_GAIN_INVERSE = (0.8, 0.1)
"""Mean and std of the normal draw whose inverse is the brightness (exposure) gain."""
GAMMA = 2.2
HIGHLIGHT_START = 0.9
"""Grey level above which undoing the white balance spares the pixel (Brooks et al.'s inflection)."""
READ_FROM_SHOT = (2.18, 1.20, 0.26)
"""``log(read) = a log(shot) + b + N(0, c)``: the read-noise variance's line against the shot
noise's, fitted by Brooks et al. to real sensors."""
RAW_REFERENCE = 0.18
"""The raw value (a mid-grey) at which the level is the noise's standard deviation."""
JPEG_QUALITY = (70, 98)
"""Range the JPEG quality is drawn from, uniformly, when the draw gives JPEG."""
JPEG_SHARE = 0.5
"""Share of draws that end in JPEG (the others stay lossless)."""
BILINEAR_SHARE = 0.25
"""Share of draws demosaicked bilinearly (colour fringes at fine detail, as cheap cameras leave);
the others by Malvar-He-Cutler, close to what cameras do."""

_MHC = np.array([
    # green at red and blue sites
    [[0, 0, -2, 0, 0], [0, 0, 4, 0, 0], [-2, 4, 8, 4, -2], [0, 0, 4, 0, 0], [0, 0, -2, 0, 0]],
    # red (blue) at green sites in a red (blue) row
    [[0, 0, 1, 0, 0], [0, -2, 0, -2, 0], [-2, 8, 10, 8, -2], [0, -2, 0, -2, 0], [0, 0, 1, 0, 0]],
    # red (blue) at green sites in a blue (red) row: the same, transposed
    [[0, 0, -2, 0, 0], [0, -2, 8, -2, 0], [1, 0, 10, 0, 1], [0, -2, 8, -2, 0], [0, 0, -2, 0, 0]],
    # red at blue sites and blue at red sites
    [[0, 0, -3, 0, 0], [0, 4, 0, 4, 0], [-3, 0, 12, 0, -3], [0, 4, 0, 4, 0], [0, 0, -3, 0, 0]],
], np.float64) / 16.0
"""Malvar, He and Cutler's 5x5 demosaicking filters (ICASSP 2004), each on the whole mosaic."""


def shot_read(level: float, spread: float = 0.0) -> tuple[float, float]:
    """(shot, read) variances whose noise has std ``level`` (0..255) at ``RAW_REFERENCE``.

    ``spread`` moves the read noise off its line (in natural-log units of its variance); the level
    is then met only approximately, as on a real sensor.
    """
    target = (level / 255.0) ** 2
    if target <= 0:
        return 0.0, 0.0
    slope, offset, _ = READ_FROM_SHOT

    def variance(log_shot: float) -> float:
        return math.exp(log_shot) * RAW_REFERENCE + math.exp(slope * log_shot + offset)

    low, high = -40.0, 5.0
    for _ in range(100):  # variance is increasing in log(shot): bisect
        middle = 0.5 * (low + high)
        low, high = (middle, high) if variance(middle) < target else (low, middle)
    log_shot = 0.5 * (low + high)
    return math.exp(log_shot), math.exp(slope * log_shot + offset + spread)


@dataclass(frozen=True)
class Camera:
    """One draw of a camera: its colour, gains, noise, demosaicking and JPEG."""

    rgb_to_camera: np.ndarray
    """(3, 3), rows summing to 1 (grey stays grey in camera space)."""
    red_gain: float
    blue_gain: float
    brightness_gain: float
    shot: float
    read: float
    demosaic: str
    """``"mhc"`` (Malvar, He and Cutler's gradient-corrected filters) or ``"bilinear"``."""
    jpeg_quality: int | None


def draw_camera(level: float, rng: np.random.Generator, jpeg: bool | None = None) -> Camera:
    """A camera at noise ``level``, its other properties drawn from ``rng``.

    ``jpeg``: True always compresses, False never, None draws (``JPEG_SHARE``).
    """
    weights = rng.uniform(1e-8, 1.0, len(XYZ_TO_CAMERA))
    xyz_to_camera = np.tensordot(weights / weights.sum(), XYZ_TO_CAMERA, axes=1)
    rgb_to_camera = xyz_to_camera @ RGB_TO_XYZ
    rgb_to_camera /= rgb_to_camera.sum(axis=1, keepdims=True)
    red = rng.uniform(*RED_GAIN)
    blue = rng.uniform(*BLUE_GAIN)
    brightness = 1.0 / max(0.5, rng.normal(*BRIGHTNESS_GAIN_INVERSE))
    shot, read = shot_read(level, rng.normal(0.0, READ_FROM_SHOT[2]))
    demosaic = "bilinear" if rng.random() < BILINEAR_SHARE else "mhc"
    compress = bool(rng.random() < JPEG_SHARE) if jpeg is None else jpeg
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    return Camera(rgb_to_camera, red, blue, brightness, shot, read, demosaic, quality if compress else None)


def _smoothstep_inverse(y: np.ndarray) -> np.ndarray:
    y = np.clip(y, 0.0, 1.0)
    return 0.5 - np.sin(np.arcsin(1.0 - 2.0 * y) / 3.0)


def _mosaic_gains(camera: Camera) -> np.ndarray:
    """Per-channel gains the camera applies to its raw values: white balance times brightness."""
    return np.array([camera.red_gain, 1.0, camera.blue_gain]) * camera.brightness_gain


def unprocess(x: np.ndarray, camera: Camera) -> np.ndarray:
    """sRGB (H, W, 3) in [0, 1] -> the raw RGGB mosaic (H, W) a camera would have recorded."""
    linear = np.maximum(_smoothstep_inverse(x), 1e-8) ** GAMMA
    cam = linear @ camera.rgb_to_camera.T
    gains = 1.0 / _mosaic_gains(camera)
    grey = cam.mean(axis=-1, keepdims=True)
    spare = (np.maximum(grey - HIGHLIGHT_START, 0.0) / (1.0 - HIGHLIGHT_START)) ** 2
    cam = np.clip(cam * np.maximum(spare + (1.0 - spare) * gains, gains), 0.0, 1.0)
    raw = np.empty(x.shape[:2], cam.dtype)
    raw[0::2, 0::2] = cam[0::2, 0::2, 0]
    raw[0::2, 1::2] = cam[0::2, 1::2, 1]
    raw[1::2, 0::2] = cam[1::2, 0::2, 1]
    raw[1::2, 1::2] = cam[1::2, 1::2, 2]
    return raw


def add_sensor_noise(raw: np.ndarray, camera: Camera, rng: np.random.Generator) -> np.ndarray:
    """Shot and read noise (Gaussian, variance ``shot * raw + read``), clipped as the sensor's range."""
    std = np.sqrt(camera.shot * raw + camera.read)
    return np.clip(raw + std * rng.standard_normal(raw.shape), 0.0, 1.0)


def develop(raw: np.ndarray, camera: Camera) -> np.ndarray:
    """The raw mosaic -> sRGB (H, W, 3) float in [0, 1], before any JPEG."""
    gains = _mosaic_gains(camera)
    balanced = raw.copy()
    balanced[0::2, 0::2] *= gains[0]
    balanced[0::2, 1::2] *= gains[1]
    balanced[1::2, 0::2] *= gains[1]
    balanced[1::2, 1::2] *= gains[2]
    balanced = np.clip(balanced, 0.0, 1.0)
    cam = demosaic_mhc(balanced) if camera.demosaic == "mhc" else demosaic_bilinear(balanced)
    linear = np.clip(cam @ np.linalg.inv(camera.rgb_to_camera).T, 0.0, 1.0)
    y = np.maximum(linear, 1e-8) ** (1.0 / GAMMA)
    return np.clip(3.0 * y * y - 2.0 * y**3, 0.0, 1.0)


def demosaic_bilinear(raw: np.ndarray) -> np.ndarray:
    """RGGB mosaic (H, W) -> (H, W, 3) by bilinear interpolation (OpenCV's)."""
    raw16 = np.round(raw * 65535.0).astype(np.uint16)
    # OpenCV names Bayer patterns by the second row: its "BG" is the RGGB mosaic built above.
    return cv2.cvtColor(raw16, cv2.COLOR_BayerBG2RGB).astype(np.float64) / 65535.0


def demosaic_mhc(raw: np.ndarray) -> np.ndarray:
    """RGGB mosaic (H, W) -> (H, W, 3) by Malvar-He-Cutler's gradient-corrected linear filters."""
    green, across_same, across_other, diagonal = (
        cv2.filter2D(raw, cv2.CV_64F, k, borderType=cv2.BORDER_REFLECT_101) for k in _MHC)
    out = np.repeat(raw[..., None], 3, axis=2)
    r_site, b_site = (slice(0, None, 2), slice(0, None, 2)), (slice(1, None, 2), slice(1, None, 2))
    g_in_r_row, g_in_b_row = (slice(0, None, 2), slice(1, None, 2)), (slice(1, None, 2), slice(0, None, 2))
    out[r_site + (1,)] = green[r_site]
    out[b_site + (1,)] = green[b_site]
    out[r_site + (2,)] = diagonal[r_site]
    out[b_site + (0,)] = diagonal[b_site]
    out[g_in_r_row + (0,)] = across_same[g_in_r_row]
    out[g_in_r_row + (2,)] = across_other[g_in_r_row]
    out[g_in_b_row + (2,)] = across_same[g_in_b_row]
    out[g_in_b_row + (0,)] = across_other[g_in_b_row]
    return np.clip(out, 0.0, 1.0)


def jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    """``x`` (H, W, 3) float in [0, 1] through an 8-bit JPEG at ``quality`` (4:2:0, as most cameras)."""
    pixels = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality), subsampling="4:2:0")
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), np.float64) / 255.0


def camera_pair(x: np.ndarray, camera: Camera, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, clean twin) of sRGB ``x`` (H, W, 3) through ``camera``; both float64 in [0, 1], 8-bit levels."""
    raw = unprocess(np.asarray(x, np.float64), camera)
    noisy = develop(add_sensor_noise(raw, camera, rng), camera)
    clean = develop(raw, camera)
    if camera.jpeg_quality is not None:
        return jpeg(noisy, camera.jpeg_quality), jpeg(clean, camera.jpeg_quality)
    return np.round(noisy * 255.0) / 255.0, np.round(clean * 255.0) / 255.0
