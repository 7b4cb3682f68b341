"""Synthetic noise, seeded: the noises of the paper's tests, on float images in [0, 1].

Every model takes an (H, W, C) float array ``x`` in [0, 1], a level, and ``rng``
(a ``numpy.random.Generator``, or an int seed for ``np.random.default_rng``), and
returns a new float array of the same shape, clipped to [0, 1]. The paper's noises
draw per element (every channel of every pixel gets its own), as the authors' scripts
and MATLAB's ``imnoise`` on an RGB array do. Levels are in the units the paper
uses: Gaussian sigma on the 0..255 scale, Poisson scale alpha, speckle variance,
salt-and-pepper density. The camera kinds (``camera``, ``poissongaussian``,
``gaussianjpeg``) give their level as a standard deviation on the 0..255 scale.

Correlated noise comes in two forms, on purpose: ``correlated``, the test kind (white noise
through a 3x3 box, channel by channel), and :func:`structured_noise`, the family training draws
from (brightness and colour blurred by drawn amounts, on torch generators). Testing on a form
no network was trained on keeps the unseen-noise tables honest.

``camera`` also changes the clean image (its pipeline demosaics and develops it):
:func:`noisy_pair` returns the noisy image with the clean image it should be compared to.

>>> noisy = apply_noise(clean, "poisson", 2, rng=0)
>>> parse_noise_spec("gaussian:15,poisson:2,speckle:0.024,saltpepper:0.002")
[('gaussian', 15.0), ('poisson', 2.0), ('speckle', 0.024), ('saltpepper', 0.002)]
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from . import camera
from .metrics import gaussian_window

Rng = np.random.Generator | int | None

#: Mixture levels are tied to Gaussian sigma s: at s = 15 every part is at the paper's own test level.
MIXTURE_SPECKLE_PER_SIGMA = 0.024 / 15
MIXTURE_SALTPEPPER_PER_SIGMA = 0.002 / 15


def as_rng(rng: Rng) -> np.random.Generator:
    """A Generator as is; an int (or None) seeds ``np.random.default_rng``."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def seed_sequence(*keys: int | str | float) -> np.random.SeedSequence:
    """The one way this package derives a random stream from a tuple of keys (a seed, a step, an
    image index, a noise name, ...): NumPy's SeedSequence over them, so nearby tuples give
    unrelated streams and the result doesn't depend on the order anything is processed in.

    Non-negative integers enter as they are, negative ones as their low 32 bits; strings and
    floats as the CRC-32 of their text (stable across runs and machines, unlike ``hash``).
    """
    entropy = []
    for key in keys:
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            entropy.append(int(key) if key >= 0 else int(key) & 0xFFFFFFFF)
        else:
            text = f"{key:g}" if isinstance(key, float) else str(key)
            entropy.append(zlib.crc32(text.encode()))
    return np.random.SeedSequence(entropy)


def derived_rng(seed: int, *keys: int | str | float) -> np.random.Generator:
    """A NumPy Generator of its own for ``seed`` and a tuple of keys (:func:`seed_sequence`)."""
    return np.random.default_rng(seed_sequence(seed, *keys))


def derive_seed(*keys: int | str | float) -> int:
    """A 63-bit integer seed (for a ``torch.Generator``) for a tuple of keys (:func:`seed_sequence`)."""
    state = seed_sequence(*keys).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _check_image(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"noise models work on float images in [0, 1], got {x.dtype} (use imageio.to_float)")
    if x.ndim != 3:
        raise ValueError(f"expected an (H, W, C) array, got shape {x.shape}")
    return x


def _finish(y: np.ndarray, like: np.ndarray) -> np.ndarray:
    return np.clip(y, 0.0, 1.0).astype(like.dtype, copy=False)


def gaussian(x: np.ndarray, sigma255: float, rng: Rng = None) -> np.ndarray:
    """White Gaussian noise: ``y = clip(x + n, 0, 1)``, ``n ~ N(0, (sigma255/255)^2)`` per element."""
    x = _check_image(x)
    n = as_rng(rng).normal(0.0, sigma255 / 255.0, x.shape)
    return _finish(x + n, x)


def correlated(x: np.ndarray, sigma255: float, rng: Rng = None) -> np.ndarray:
    """Spatially correlated Gaussian noise: white noise through a 3x3 box filter.

    ``w ~ N(0, 1)`` per element on an (H+2, W+2, C) grid; ``b = box3x3(w)`` ('valid',
    so every output pixel averages 9 draws and the statistics are the same up to the
    border); ``b`` has std 1/3, so ``n = 3 * b * sigma255/255`` has std sigma255/255;
    ``y = clip(x + n, 0, 1)``. Neighbours share 6 of 9 draws horizontally or
    vertically (correlation 6/9) and 4 of 9 diagonally (4/9). Not clipped before filtering.
    """
    x = _check_image(x)
    h, w, c = x.shape
    white = as_rng(rng).standard_normal((h + 2, w + 2, c))
    rows = white[:-2] + white[1:-1] + white[2:]
    box = (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 9.0
    return _finish(x + box * (3.0 * sigma255 / 255.0), x)


YCBCR_TO_RGB = ((1.0, 0.0, 1.402), (1.0, -0.344136, -0.714136), (1.0, 1.772, 0.0))
"""JPEG's (BT.601 full-range) YCbCr back to RGB: columns are what a unit of Y, Cb, Cr adds to R, G, B."""
LUMA_BLUR = (0.0, 1.0)
CHROMA_BLUR = (0.0, 2.0)
CHROMA_RATIO = (0.3, 1.2)
"""Ranges :func:`structured_noise`'s shape is drawn from, uniformly, per field."""


def uniform_draw(generator, low: float, high: float) -> float:
    """A draw from U(low, high) from a ``torch.Generator``; none (the stream untouched) when the
    range is one value."""
    import torch

    return low if low == high else low + (high - low) * float(torch.rand((), generator=generator))


def _unit_blur(x, std: float, border: int):
    """Gaussian blur of a (N, H, W) white torch field, cropped by ``border`` on every side, scaled back to unit std."""
    import torch

    if std < 0.05:  # under a twentieth of a pixel the blur is the identity
        return x[:, border : x.shape[1] - border, border : x.shape[2] - border]
    k = torch.from_numpy(gaussian_window(std, border)).float()
    gain = float((k * k).sum())  # the separable blur's output std for unit white input
    n = x.shape[0]
    x = torch.nn.functional.conv2d(x[:, None], k.view(1, 1, 1, -1))
    x = torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1))
    return x.view(n, x.shape[2], x.shape[3]) / gain


def structured_noise(size: int, sigma: float, generator):
    """(3, size, size) torch Gaussian noise with a camera's structure, per-channel RMS std ``sigma``
    (on [0, 1]), from a ``torch.Generator``: the correlated noise training draws.

    A camera's sRGB noise is not white: demosaicking correlates neighbouring pixels, and the
    colour pipeline and JPEG's chroma subsampling leave the colour part coarser than the
    brightness part and at its own level. So the noise is drawn in YCbCr: white Gaussian fields
    for Y, Cb and Cr, Y blurred by a Gaussian of std in ``LUMA_BLUR`` px, Cb and Cr by one in
    ``CHROMA_BLUR``, each scaled back to unit std; chroma's level is ``CHROMA_RATIO`` times the
    luma's; then to RGB, scaled so the three channels' mean variance is ``sigma**2``. Still
    Gaussian noise (a linear map of white noise): no real noise, no camera model is learnt from.
    """
    import torch

    luma_blur, chroma_blur, ratio = (uniform_draw(generator, *r) for r in (LUMA_BLUR, CHROMA_BLUR, CHROMA_RATIO))
    border = max(1, int(np.ceil(3 * CHROMA_BLUR[1])))
    white = torch.randn((3, size + 2 * border, size + 2 * border), generator=generator)
    ycc = torch.cat([_unit_blur(white[:1], luma_blur, border), _unit_blur(white[1:], chroma_blur, border)])
    ycc[1:] *= ratio
    to_rgb = torch.tensor(YCBCR_TO_RGB)
    rgb = torch.einsum("ij,jhw->ihw", to_rgb, ycc)
    variance = float((to_rgb**2 @ torch.tensor([1.0, ratio**2, ratio**2])).mean())
    return rgb * (sigma / variance**0.5)


def poisson(x: np.ndarray, alpha: float, rng: Rng = None) -> np.ndarray:
    """The authors' Poisson noise (from BasicSR's ``add_poisson_noise``), scale ``alpha``.

    ``q = round(255 x) / 255`` (8-bit levels); ``v = 2^ceil(log2(#unique values of q))``
    over the whole image; ``n = Poisson(q v) / v - q``; ``y = clip(x + alpha n, 0, 1)``.
    The added noise has mean 0 and variance ``alpha^2 q / v`` (before clipping):
    signal dependent, strongest in the highlights. The paper's McMaster set uses alpha = 2.
    """
    x = _check_image(x)
    q = np.clip(np.round(x.astype(np.float64) * 255.0), 0, 255) / 255.0
    levels = len(np.unique(q))
    v = 2.0 ** math.ceil(math.log2(levels))
    n = as_rng(rng).poisson(q * v) / v - q
    return _finish(x + alpha * n, x)


def speckle(x: np.ndarray, variance: float, rng: Rng = None) -> np.ndarray:
    """MATLAB ``imnoise(I, 'speckle', v)``: ``y = clip(x + n x, 0, 1)``.

    ``n`` is uniform with mean 0 and variance v, i.e. on [-sqrt(3v), sqrt(3v)]
    (MATLAB: ``sqrt(12 v) * (rand - 0.5)``), per element; the added noise has
    variance ``v x^2``. The paper's script uses v = 0.024.
    """
    x = _check_image(x)
    half = math.sqrt(3.0 * variance)
    n = as_rng(rng).uniform(-half, half, x.shape)
    return _finish(x + n * x, x)


def salt_and_pepper(x: np.ndarray, density: float, rng: Rng = None) -> np.ndarray:
    """MATLAB ``imnoise(I, 'salt & pepper', d)``, per element (per channel value).

    With ``u ~ U[0, 1)`` per element: ``u < d/2`` -> 0 (pepper), ``d/2 <= u < d`` -> 1
    (salt), otherwise unchanged. About a fraction d of the values change, half each way.
    """
    x = _check_image(x)
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"salt-and-pepper density must be in [0, 1], got {density}")
    u = as_rng(rng).random(x.shape)
    y = x.copy()
    y[u < density / 2] = 0.0
    y[(u >= density / 2) & (u < density)] = 1.0
    return _finish(y, x)


def mixture(x: np.ndarray, sigma255: float, rng: Rng = None) -> np.ndarray:
    """Gaussian, then speckle, then salt and pepper, all tied to one level ``s``.

    ``y = saltpepper(speckle(gaussian(x, s), v = 0.024 s/15), d = 0.002 s/15)``, each
    stage clipped to [0, 1] as applying ``imnoise`` in turn would. At s = 15 each part
    is at the paper's own test level (Gaussian 15, speckle 0.024, salt and pepper 0.002).
    """
    g = as_rng(rng)
    y = gaussian(x, sigma255, g)
    y = speckle(y, sigma255 * MIXTURE_SPECKLE_PER_SIGMA, g)
    return salt_and_pepper(y, min(1.0, sigma255 * MIXTURE_SALTPEPPER_PER_SIGMA), g)


POISSON_GAUSSIAN_READ_SHARE = 0.2
"""Share of the Poisson-Gaussian noise's variance at mid-grey that does not depend on the signal."""
GAUSSIAN_JPEG_QUALITY = 80
"""The JPEG quality of ``gaussianjpeg``: a camera's or a web service's everyday setting."""


def poisson_gaussian(x: np.ndarray, level: float, rng: Rng = None) -> np.ndarray:
    """Signal-dependent noise as a sensor's, in sRGB: variance ``(level/255)^2 (0.2 + 1.6 x)``.

    The heteroscedastic Gaussian model of Foi et al. (2008): a shot part growing with the
    value ``x`` and a constant read part, ``level`` being the std at mid-grey (x = 0.5), where
    the read part is ``POISSON_GAUSSIAN_READ_SHARE`` of the variance. Per element.
    """
    x = _check_image(x)
    return _finish(x + poisson_gaussian_std(x, level) * as_rng(rng).standard_normal(x.shape), x)


def poisson_gaussian_std(x: np.ndarray, level: float) -> np.ndarray:
    """The per-element standard deviation of :func:`poisson_gaussian`'s noise on image ``x``."""
    read = POISSON_GAUSSIAN_READ_SHARE
    return (level / 255.0) * np.sqrt(read + 2.0 * (1.0 - read) * np.clip(x, 0.0, 1.0))


def gaussian_jpeg(x: np.ndarray, sigma255: float, rng: Rng = None) -> np.ndarray:
    """White Gaussian noise of ``sigma255``, then 8-bit JPEG at ``GAUSSIAN_JPEG_QUALITY`` (4:2:0).

    What a web upload or a phone's re-save does to a noisy picture: the finest noise goes,
    blotches remain.
    """
    y = gaussian(x, sigma255, rng)
    return _from_rgb(camera.jpeg(_to_rgb(y), GAUSSIAN_JPEG_QUALITY), x)


def camera_noise(x: np.ndarray, level: float, rng: Rng = None) -> np.ndarray:
    """A camera's noise at ``level`` (``mitdenoise.camera``): the noisy image alone. :func:`noisy_pair` gives its twin."""
    return camera_pair(x, level, rng)[0]


def camera_pair(x: np.ndarray, level: float, rng: Rng = None) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, clean twin) through a camera drawn from ``rng`` at ``level`` (``mitdenoise.camera``)."""
    x = _check_image(x)
    g = as_rng(rng)
    noisy, clean = camera.camera_pair(_to_rgb(x), camera.draw_camera(level, g), g)
    return _from_rgb(noisy, x), _from_rgb(clean, x)


def _to_rgb(x: np.ndarray) -> np.ndarray:
    """The colour of an (H, W, C) image as (H, W, 3): grey repeated, alpha left out."""
    if x.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected 1, 3 or 4 channels, got {x.shape[2]}")
    return np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x[..., :3]


def _from_rgb(rgb: np.ndarray, like: np.ndarray) -> np.ndarray:
    """:func:`_to_rgb` undone: grey as the mean of R, G, B, ``like``'s alpha put back; ``like``'s dtype."""
    if like.shape[2] == 1:
        rgb = rgb.mean(axis=2, keepdims=True)
    elif like.shape[2] == 4:
        rgb = np.concatenate([rgb, like[..., 3:]], axis=2)
    return rgb.astype(like.dtype, copy=False)


NoiseModel = Callable[[np.ndarray, float, Rng], np.ndarray]

NOISES: dict[str, NoiseModel] = {
    "gaussian": gaussian,
    "correlated": correlated,
    "poisson": poisson,
    "speckle": speckle,
    "saltpepper": salt_and_pepper,
    "mixture": mixture,
    "camera": camera_noise,
    "poissongaussian": poisson_gaussian,
    "gaussianjpeg": gaussian_jpeg,
}

LEVEL_UNITS = {
    "gaussian": "sigma on 0..255",
    "correlated": "sigma on 0..255",
    "poisson": "scale alpha",
    "speckle": "variance",
    "saltpepper": "density in [0, 1]",
    "mixture": "Gaussian sigma on 0..255",
    "camera": "raw noise std on 0..255 at mid-grey",
    "poissongaussian": "std on 0..255 at mid-grey",
    "gaussianjpeg": "sigma on 0..255",
}

ALIASES = {"gauss": "gaussian", "sp": "saltpepper", "s&p": "saltpepper", "salt_and_pepper": "saltpepper",
           "salt-and-pepper": "saltpepper", "saltandpepper": "saltpepper", "mix": "mixture",
           "poisson-gaussian": "poissongaussian", "pg": "poissongaussian", "gaussian-jpeg": "gaussianjpeg",
           "jpeg": "gaussianjpeg"}


def canonical_kind(kind: str) -> str:
    """The registry name for ``kind`` (case-insensitive, a few aliases); ValueError if unknown."""
    name = kind.strip().lower()
    name = ALIASES.get(name, name)
    if name not in NOISES:
        raise ValueError(f"unknown noise kind {kind.strip()!r}: use one of {', '.join(NOISES)}")
    return name


def check_level(kind: str, level: float) -> float:
    """``level`` as a float if it is valid for ``kind``; ValueError naming the unit otherwise."""
    level = float(level)
    if not math.isfinite(level) or level < 0 or (kind == "saltpepper" and level > 1):
        raise ValueError(f"bad level {level:g} for {kind} noise: expected a {LEVEL_UNITS[kind]} >= 0")
    return level


def apply_noise(x: np.ndarray, kind: str, level: float, rng: Rng = None) -> np.ndarray:
    """Apply noise model ``kind`` (a :data:`NOISES` name or alias) at ``level``."""
    name = canonical_kind(kind)
    return NOISES[name](x, check_level(name, level), as_rng(rng))


def noisy_pair(x: np.ndarray, kind: str, level: float, rng: Rng = None) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, reference): the noisy image and the clean image to score it against.

    The reference is ``x`` itself for every kind but ``camera``, whose pipeline also changes
    the clean image (its clean twin: the same camera without the noise).
    """
    name = canonical_kind(kind)
    level = check_level(name, level)
    if name == "camera":
        return camera_pair(x, level, as_rng(rng))
    return NOISES[name](x, level, as_rng(rng)), x


def parse_noise_spec(spec: str) -> list[tuple[str, float]]:
    """``"gaussian:15,poisson:2"`` -> ``[("gaussian", 15.0), ("poisson", 2.0)]``.

    Items are ``kind:level`` separated by commas; kinds are :data:`NOISES` names
    (or aliases such as ``sp``); repeated items are kept once. ValueError with the
    offending item on bad input.
    """
    items: list[tuple[str, float]] = []
    parts = [p.strip() for p in str(spec).split(",")]
    if not any(parts):
        raise ValueError("empty noise spec: expected kind:level items such as gaussian:15,poisson:2")
    for part in parts:
        if not part:
            continue
        kind, sep, level_text = part.partition(":")
        if not sep or not level_text.strip():
            raise ValueError(f"bad noise spec item {part!r}: expected kind:level, e.g. gaussian:15")
        try:
            name = canonical_kind(kind)
        except ValueError as e:
            raise ValueError(f"bad noise spec item {part!r}: {e}") from None
        try:
            level = float(level_text)
        except ValueError:
            raise ValueError(f"bad noise spec item {part!r}: level {level_text.strip()!r} is not a number") from None
        try:
            level = check_level(name, level)
        except ValueError as e:
            raise ValueError(f"bad noise spec item {part!r}: {e}") from None
        if (name, level) not in items:
            items.append((name, level))
    return items


def noise_label(kind: str, level: float) -> str:
    """``("gaussian", 15.0)`` -> ``"gaussian:15"`` (the spec form, shortest float)."""
    return f"{kind}:{level:g}"


WHITE_PATCH = 8
"""Side of the patches whose covariance spectrum gives the white-noise level."""
WEAK_TEXTURE_PATCH = 16
WEAK_TEXTURE_SHARE = 0.05
"""The flattest 5 % of 16x16 patches (after removing each one's best-fit plane) give the total
noise variance, correlated noise included."""
LOWEST_SHARE_MEAN_Z = 2.063
"""phi(z) / q at q = 0.05 (z = -1.645): under white noise a patch's variance is sigma^2 chi2(k)/k,
and the mean of its lowest 5 % is sigma^2 (1 - 2.063 sqrt(2 / k)) (normal approximation); the
estimate is divided by that, so white noise reads true."""
MAX_PATCHES = 20_000
"""Patches sampled per estimate, whatever the image size: a grid stride grows with the image."""
CLIPPED_MARGIN = 12 / 255
"""Patches whose mean lies this close to 0 or 1 are left out: clipping hides their noise."""


class NoiseEstimate(NamedTuple):
    """What :func:`estimate_noise` reads from an image."""

    sigma: float
    """Noise standard deviation, on the image's [0, 1] scale: :func:`estimate_sigma`."""
    white_sigma: float
    """The white-noise part alone (the patch-covariance estimate): true for white noise even on
    textured images, where ``sigma`` reads texture as noise; low on a camera's noise."""
    correlation: float
    """Mean correlation of the noise between horizontal and vertical neighbours, on the flattest
    patches: about 0 for white noise, 0.5-0.8 for a camera's demosaicked, JPEG-compressed noise.
    Fine texture that survives in those patches reads as correlation too, so a nearly clean image
    reads 0.2-0.7."""


def estimate_sigma(x: np.ndarray) -> float:
    """Noise standard deviation of ``x`` (float, [0, 1] scale), for white and for camera noise.

    Two estimates, the larger one wins:

    - white noise: the eigenvalues of the covariance of 8x8 patches (all channels), after
      Chen, Zhu & Heng (ICCV 2015): the noise variance is the mean of the largest set of
      smallest eigenvalues whose mean is not above their median. Exact for white Gaussian
      noise, but it reads almost nothing on camera noise, whose demosaicking and JPEG leave
      little energy in the finest frequencies those eigenvalues see.
    - weak texture: the residual variance of the flattest 16x16 patches about their best-fit
      planes, which counts correlated noise whole. Texture that survives the plane fit makes
      it read a little high on nearly clean images.

    Accuracy, measured: ``docs/benchmarks.md`` ("Noise-level estimator").
    """
    return estimate_noise(x).sigma


def estimate_noise(x: np.ndarray) -> NoiseEstimate:
    """Noise level and neighbour correlation of ``x`` (float, [0, 1] scale, (H, W[, C])).

    The level is :func:`estimate_sigma`'s; the correlation comes from the same flattest
    patches' residuals. Together they tell white noise (correlation near 0) from a camera's.
    """
    x = np.asarray(x, np.float64)
    if x.ndim == 2:
        x = x[..., None]
    h, w = x.shape[:2]
    if h < WEAK_TEXTURE_PATCH or w < WEAK_TEXTURE_PATCH:
        raise ValueError(f"image too small to estimate noise: {h}x{w} (at least {WEAK_TEXTURE_PATCH}x{WEAK_TEXTURE_PATCH})")
    weak_sigma, correlation = _weak_texture(x)
    white_sigma = _white_noise_sigma(x)
    return NoiseEstimate(max(white_sigma, weak_sigma), white_sigma, correlation)


def _patches(x: np.ndarray, size: int, stride: int) -> np.ndarray:
    """(N, C, size * size): patches on a grid of ``stride`` pixels, or coarser, to keep at most ``MAX_PATCHES``."""
    stride = max(stride, math.ceil(math.sqrt(x.shape[0] * x.shape[1] / MAX_PATCHES)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (size, size), axis=(0, 1))[::stride, ::stride]
    return windows.reshape(-1, x.shape[2], size * size)


def _white_noise_sigma(x: np.ndarray, stride: int = WHITE_PATCH // 2) -> float:
    rows = _patches(x, WHITE_PATCH, stride).reshape(-1, x.shape[2] * WHITE_PATCH**2)
    rows = rows - rows.mean(axis=0)
    eigenvalues = np.sort(np.linalg.eigvalsh(rows.T @ rows / len(rows)))
    for n in range(len(eigenvalues), 0, -1):
        smallest = eigenvalues[:n]
        mean = smallest.mean()
        if np.count_nonzero(smallest > mean) >= np.count_nonzero(smallest < mean):
            return float(np.sqrt(max(mean, 0.0)))
    return float(np.sqrt(max(eigenvalues[0], 0.0)))


def white_noise_variances(x: np.ndarray) -> np.ndarray:
    """The white noise's variance in each channel of float (H, W, C) ``x`` ([0, 1] scale); shape (C,).

    A noise that grows with the signal (a sensor's shot noise) differs between the channels of a
    coloured scene, which the patch-covariance estimate over all channels at once (``white_sigma``
    of :func:`estimate_noise`) mixes into one level. Channel by channel the same estimate has fewer
    dimensions to set texture apart, and on a textured image reads every channel high by about the
    same factor; so the channels' own estimates only scale each channel to the same noise, and the
    estimate over all of them, scaled so, reads that factor; a channel that reads no noise keeps
    none. Patches as dense as ``MAX_PATCHES`` allows, at every position on a small image: every 4th
    leaves too few there for the smallest eigenvalues of their covariance, which then spread below
    the noise's."""
    x = np.asarray(x, np.float64)
    own = np.array([_white_noise_sigma(x[..., c : c + 1], 1) ** 2 for c in range(x.shape[2])])
    noisy = own > 0
    if x.shape[2] == 1 or not noisy.any():
        return own
    own[noisy] *= _white_noise_sigma(x[..., noisy] / np.sqrt(own[noisy]), 1) ** 2
    return own


def _weak_texture(x: np.ndarray) -> tuple[float, float]:
    """(sigma, neighbour correlation) of the residuals of the flattest patches about their planes."""
    size = WEAK_TEXTURE_PATCH
    rows = _patches(x, size, size // 2)
    yy, xx = np.mgrid[:size, :size]
    plane, _ = np.linalg.qr(np.stack([np.ones(size * size), yy.ravel(), xx.ravel()], axis=1))
    residual = rows - (rows @ plane) @ plane.T
    variance = (residual**2).sum(axis=-1).mean(axis=-1) / (size * size - plane.shape[1])
    means = rows.mean(axis=-1)
    unclipped = ((means > CLIPPED_MARGIN) & (means < 1 - CLIPPED_MARGIN)).all(axis=-1)
    if unclipped.sum() >= 20:
        variance, residual = variance[unclipped], residual[unclipped]
    k = max(1, int(WEAK_TEXTURE_SHARE * len(variance)))
    flattest = np.argpartition(variance, k - 1)[:k]
    lowest = variance[flattest].mean()
    degrees = x.shape[2] * (size * size - plane.shape[1])
    sigma = float(np.sqrt(lowest / (1 - LOWEST_SHARE_MEAN_Z * math.sqrt(2 / degrees))))
    r = residual[flattest].reshape(k, x.shape[2], size, size)
    power = (r**2).mean()
    neighbours = 0.5 * ((r[..., :, 1:] * r[..., :, :-1]).mean() + (r[..., 1:, :] * r[..., :-1, :]).mean())
    return sigma, float(neighbours / power) if power > 1e-12 else 0.0
