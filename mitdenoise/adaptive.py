"""``mitdenoise-auto``, our shipped model: read the noise, then pick a network, a strength and a second stage.

No one network we can train at our budget is best at every noise. ``mitdenoise-mild``, trained
at Gaussian sigma 15, is our best on white noise up to about that level, but it smooths lighter
noise into an image worse than its input and leaves a camera's coarse colour blotches in place.
``mitdenoise-camera``, trained blind on white and on camera-structured Gaussian noise, removes
those and heavier white noise, and costs detail on light white noise. So the route first reads
the noise (:func:`~mitdenoise.noise.estimate_noise`):

- a camera's noise (neighbours correlated, almost no white part): ``mitdenoise-camera``, then
  non-local means of the *input* guided by its output (BM3D's second stage in non-local means
  form, :mod:`.nonlocal_means`), which averages blotches wider than the network's 8x8 windows
  and gives back texture the network took for noise;
- heavy white noise: ``mitdenoise-camera`` (it saw white noise up to sigma 30), then non-local
  means of its own output;
- lighter white noise: ``mitdenoise-mild`` at a strength that grows with the level (half its
  change at sigma 5), so texture survives.

Where the numbers below come from: ``docs/experiments.md`` ("The shipped default: a route over
two networks"). The strengths were measured on held-out training images; the second stage's
``h`` and the camera test were chosen on CC15, our real-noise development set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from .noise import WEAK_TEXTURE_PATCH, NoiseEstimate, estimate_noise
from .nonlocal_means import nonlocal_means

CAMERA_CORRELATION = 0.5
"""Noise whose neighbour correlation reads at least this ..."""
CAMERA_WHITE_SIGMA = 2 / 255
"""... and whose white part reads below this is treated as a camera's (demosaicking and JPEG
leave a camera's noise almost nothing in the finest frequencies)."""
HEAVY_SIGMA = 18 / 255
"""Noise whose white part reads at least this goes to the camera network (it saw white noise
up to sigma 30)."""
WHITE_STRENGTH = ((0, 0.0), (2 / 255, 0.15), (3 / 255, 0.25), (5 / 255, 0.5), (7 / 255, 0.7), (10 / 255, 0.85), (15 / 255, 1.0))
"""(white noise sigma, strength of ``mitdenoise-mild``), linear in between: the best strengths
measured at those levels on held-out training images."""
CAMERA_H_PER_SIGMA = 1.6
"""The second stage's ``h`` after ``mitdenoise-camera`` on a camera's noise, per level read ..."""
CAMERA_H_RANGE = (3 / 255, 8 / 255)
"""... and the range it is held to: a clean photo with fine texture reads like light camera
noise at a level its texture inflates, and a large ``h`` would average its texture away."""
HEAVY_WHITE_H = 5 / 255
"""The second stage's ``h`` on heavy white noise (the network's output smoothed by itself)."""


def keep_share_of_change(x, y, strength: float):
    """``y <- x + strength * (y - x)``, in place on ``y`` (a NumPy array or a tensor like ``x``):
    the share ``strength`` of the change from ``x`` to ``y``. In place because at 12 MP each
    whole-image copy is 144 MB. Returns ``y``; ``strength`` 1 leaves it untouched."""
    if strength != 1:
        y -= x
        y *= float(strength)
        y += x
    return y


class Plan(NamedTuple):
    """What the route does to one image, from its noise estimate."""

    network: str
    """``"white"`` (``mitdenoise-mild``) or ``"camera"`` (``mitdenoise-camera``)."""
    strength: float
    """Share of the network's change kept."""
    second_stage: str
    """``"none"``; ``"input"``: average the input, guided by the network's output; ``"output"``:
    average the output, guided by itself."""
    h: float
    """The second stage's ``h`` ([0, 1] scale; 0 without one)."""
    estimate: NoiseEstimate | None
    """What the plan was made from; None for an image too small to read."""

    def describe(self) -> str:
        """One line for the user: what was read and what ran."""
        if self.estimate is None:
            return "too small to read the noise: mitdenoise-mild"
        level = f"sigma {self.estimate.sigma * 255:.1f}"
        if self.network == "camera":
            kind = "camera noise" if self.second_stage == "input" else "heavy white noise"
            return f"{kind}, {level}: mitdenoise-camera + non-local means"
        return f"white noise, {level}: mitdenoise-mild at strength {self.strength:.2f}"


def plan_for(estimate: NoiseEstimate | None) -> Plan:
    """The route's choice for an image with this noise estimate."""
    if estimate is None:
        return Plan("white", 1.0, "none", 0.0, None)
    if estimate.correlation >= CAMERA_CORRELATION and estimate.white_sigma < CAMERA_WHITE_SIGMA:
        h = float(np.clip(CAMERA_H_PER_SIGMA * estimate.sigma, *CAMERA_H_RANGE))
        return Plan("camera", 1.0, "input", h, estimate)
    if estimate.white_sigma >= HEAVY_SIGMA:
        return Plan("camera", 1.0, "output", HEAVY_WHITE_H, estimate)
    sigmas, strengths = zip(*WHITE_STRENGTH)
    return Plan("white", float(np.interp(estimate.white_sigma, sigmas, strengths)), "none", 0.0, estimate)


def plan_image(pixels: np.ndarray) -> Plan:
    """Estimate the noise of float (H, W, C) pixels in [0, 1] and plan from it."""
    if min(pixels.shape[:2]) < WEAK_TEXTURE_PATCH:
        return plan_for(None)
    return plan_for(estimate_noise(pixels))


def run_plan(
    plan: Plan,
    pixels: np.ndarray,
    networks: dict[str, Callable[[np.ndarray], np.ndarray]],
    device: torch.device,
) -> np.ndarray:
    """Float (H, W, C) pixels in [0, 1] -> the plan's result, same shape, float32 in [0, 1].

    ``networks`` maps ``"white"`` and ``"camera"`` to functions that denoise such pixels.
    """
    out = keep_share_of_change(pixels, np.ascontiguousarray(networks[plan.network](pixels), dtype=np.float32), plan.strength)
    if plan.second_stage != "none":
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(2, 0, 1).to(device)
        target = as_tensor(pixels) if plan.second_stage == "input" else None
        out = nonlocal_means(as_tensor(out), plan.h, target).permute(1, 2, 0).cpu().numpy()
    return np.clip(out, 0, 1, out=out)
