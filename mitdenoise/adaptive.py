"""``mitdenoise-auto``, our shipped model: read the noise, then pick a network, a strength and a second stage.

No one network we can train at our budget is best at every noise. ``mitdenoise-mild``, trained
at Gaussian sigma 15, is our best on white noise up to about that level, but it smooths lighter
noise into an image worse than its input and leaves a camera's coarse colour blotches in place.
``mitdenoise-camera``, trained blind on white and on camera-structured Gaussian noise, removes
those and heavier white noise, and on light white noise costs detail at full strength. So the
route first reads the noise (:func:`~mitdenoise.noise.estimate_noise`):

- a camera's noise (neighbours correlated, almost no white part): ``mitdenoise-camera``, then
  non-local means of the *input* guided by its output (BM3D's second stage in non-local means
  form, :mod:`.nonlocal_means`), which averages blotches wider than the network's 8x8 windows
  and gives back texture the network took for noise. Its ``h`` follows the level read, but a
  textured photo's detail inflates that level, so ``h`` is held to twice what the camera network
  removes where the image is flat (:func:`probe`);
- heavy white noise: ``mitdenoise-camera`` (it saw white noise up to sigma 30), then non-local
  means of its own output;
- heavy noise that is not white (a phone's, or noise JPEG has smoothed): its white part reads
  light, so the white part alone would send it to the light path. Before taking that path the
  route asks ``mitdenoise-camera`` how much it would remove where the image is flat, and how
  evenly its change spreads over flat and textured regions (:func:`probe`). Far more than the
  white part explains is such noise; the more evenly the change spreads (noise is everywhere, a
  photo's own fine texture is not), the less "far more" has to be. Such noise takes the camera
  network and a second stage as strong as the level the probe read;
- lighter white noise: the network and the share of its change that err least by Stein's
  unbiased risk estimate (:func:`light_risks`), which reads from the noisy image alone, given
  the noise's level, how far each network's output is from the clean image it never saw. On
  textured photos at light noise that is often ``mitdenoise-camera`` at part strength; on white
  noise near sigma 15, where it was trained, ``mitdenoise-mild``; on a clean photo almost nothing.

Whatever ran, the route then keeps of its change only what the image's own noise explains
(:func:`limit_change_to_noise`): it reads how much noise was removed where the image is flat, as
a line over brightness, and shrinks the change wherever it is much larger than that, which is
detail taken for noise. The networks strip fine texture and a camera's own fine structure at
light noise; this gives it back without a threshold to fall off, and leaves a clean photo close
to itself.

Where the numbers below come from: ``docs/experiments.md`` ("The shipped default: a route over
two networks", and "Asking the camera network how much it would remove"). The second stage's
``h`` and the camera test were chosen on CC15, our real-noise development set; the probe's floor
on McMaster and Kodak24 crops; its bar by evenness on the noise matrix's crops and clean
McMaster, Kodak24 and CBSD68 crops, its bar by level on heavier noise on other crops of McMaster
and Kodak24 ("Heavy correlated noise below the probe's bar"); the change limit's margin on CC15
("Keeping only the change noise explains"); the cap on ``h`` by the probe on crops of all three
sets and CC15 ("Camera noise on texture: h held to the probe"); how the risk estimate reads the
noise on Kodak24 crops ("The light path by Stein's unbiased risk estimate").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from .noise import WEAK_TEXTURE_PATCH, NoiseEstimate, estimate_noise, white_noise_variances
from .nonlocal_means import nonlocal_means

CAMERA_CORRELATION = 0.5
"""Noise whose neighbour correlation reads at least this ..."""
CAMERA_WHITE_SIGMA = 2 / 255
"""... and whose white part reads below this is treated as a camera's (demosaicking and JPEG
leave a camera's noise almost nothing in the finest frequencies)."""
HEAVY_SIGMA = 18 / 255
"""Noise whose white part reads at least this goes to the camera network (it saw white noise
up to sigma 30)."""
CAMERA_H_PER_SIGMA = 1.6
"""The second stage's ``h`` after ``mitdenoise-camera`` on a camera's noise, per level read ..."""
CAMERA_H_PER_PROBE = 2.0
"""... but no more than this many times what the camera network removes where the image is flat
(:func:`probe`): texture inflates the level read, not the probe, and a large ``h`` averages a
textured photo's detail away with its noise ..."""
CAMERA_H_RANGE = (3 / 255, 8 / 255)
"""... and within this range: its floor is the least ``h`` that still pays on light camera noise,
and at its top a clean photo's texture could still be taken for heavy noise where the probe finds
no flat region."""
HEAVY_WHITE_H = 5 / 255
"""The second stage's ``h`` on heavy white noise (the network's output smoothed by itself)."""
PROBE_BLOCK = 16
PROBE_FLAT_SHARE = 0.1
"""The probe reads the camera network's change on the flattest tenth of 16x16 blocks (by the
gradients of the network's output): there the change is noise, not texture taken for it."""
PROBE_TEXTURED_SHARE = 0.2
"""Its evenness sets the change on the flattest tenth of blocks against that on the most textured
fifth, both by the gradients of the *input*: noise is changed alike on both, a clean photo's
texture taken for noise on the textured blocks alone."""
RISK_TILE = 256
RISK_TILES = 4
"""On the light path the network and its strength are chosen by the error each would make, as
Stein's unbiased risk estimate reads it (:func:`light_risks`), on at most this many tiles of this
side spread evenly over the image's grid: enough of a photo to judge it, a small part of its time."""
RISK_STEP = 1e-3
"""The size of the random step that reads how much of a small change in its input a network passes
on (the divergence in Stein's estimate): small against the noise, large against float32 rounding
(the CPU's precision; bf16 on a GPU rounds at this size, and reads it less surely)."""
PROBE_TILE = 256
PROBE_TILES = 4
"""The probe runs the network on at most this many tiles of this side: those of the image's grid
whose flattest blocks are flattest (a 12 MP photo: about 2 % of the network's time)."""
NON_WHITE_LEVEL = 4 / 255
NON_WHITE_BAR_BY_EVENNESS = (4.0, 2.5)
NON_WHITE_EVENNESS = (0.3, 0.5)
"""A light-path image whose probe level reads at least ``NON_WHITE_LEVEL`` and a bar times its
white part holds heavy noise that is not white. The bar slides from 4 down to 2.5 as the probe's
evenness rises from 0.3 to 0.5, so no one reading decides alone: a clean photo's fine, correlated
texture (demosaicked, say) can read up to 4 times its white part as well, but there the network
changes the textured blocks far more than the flat ones ..."""
NON_WHITE_HEAVY_LEVELS = (10 / 255, 20 / 255)
NON_WHITE_LOWEST_BAR = 2.0
"""... and the lower of that bar and one sliding from 4 down to 2 as the probe level rises from 10
to 20, whatever the evenness, holds: texture taken for noise reads far less than that, white
noise reads about its white part, and very heavy correlated noise two to three and a half times
it (its white part swells too). Such noise then takes the camera network and the second stage
guided by the input at ``h`` the probe level, uncapped: what the network removed where the image
is flat is the noise left to average."""
NOISE_MODEL_BLOCK = 8
NOISE_MODEL_BANDS = 8
NOISE_MODEL_FLAT_SHARE = 0.2
"""The noise the route removed is read on 8x8 blocks: in each eighth of them by brightness, the
flattest fifth, so that the model sees dark and bright noise alike. Flat by the median of the
*input's* gradients: a block the network flattened is not flat for that, and a few spikes
(impulse noise) do not hide a flat block."""
CHANGE_WINDOW = 16
"""Each pixel's change is weighed by its mean square over the 16x16 neighbourhood around it ..."""
CHANGE_MARGIN = 1.5
CHANGE_MARGIN_ERRORS = 3.0
"""... against the noise variance at its brightness times a margin: 1.5 (the flattest blocks read
less noise than there is: they are picked partly for having less, and the networks leave some in
place), raised by three standard errors of a window's mean square, which the noise's kurtosis
gives (sparse impulses fill one window and miss the next; Gaussian noise raises it by about a
sixth). More than that is detail being taken for noise."""


def keep_share_of_change(x, y, strength: float):
    """``y <- x + strength * (y - x)``, in place on ``y`` (a NumPy array or a tensor like ``x``):
    the share ``strength`` of the change from ``x`` to ``y``. In place because at 12 MP each
    whole-image copy is 144 MB. Returns ``y``; ``strength`` 1 leaves it untouched."""
    if strength != 1:
        y -= x
        y *= float(strength)
        y += x
    return y


class Probe(NamedTuple):
    """What the camera network would remove (:func:`probe`)."""

    level: float
    """The rms of its change where the image is flat ([0, 1] scale): the noise, white or not."""
    evenness: float
    """The mean square of its change on the input's flattest blocks over that on its most
    textured ones: about 1 for noise, near 0 for a clean photo's texture taken for noise; 0 where
    there are too few blocks to tell the two apart or no change at all."""


class Risk(NamedTuple):
    """What Stein's unbiased risk estimate says of one network on the light path (:func:`light_risks`)."""

    strength: float
    """The share of the network's change that errs least by the estimate."""
    error: float
    """The mean square error it estimates at that strength ([0, 1] scale)."""


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
    probe: Probe | None = None
    """What the probe read (:func:`probe`), where it was asked."""
    risks: dict[str, Risk] | None = None
    """On the light path, what Stein's estimate read of each network (:func:`light_risks`), where
    it was asked."""

    def describe(self) -> str:
        """One line for the user: what was read and what ran."""
        if self.estimate is None:
            return "too small to read the noise: mitdenoise-mild"
        level = f"sigma {self.estimate.sigma * 255:.1f}"
        if self.second_stage == "none":
            name = "mitdenoise-mild" if self.network == "white" else "mitdenoise-camera"
            return f"white noise, {level}: {name} at strength {self.strength:.2f}"
        if self.second_stage == "output":
            kind = "heavy white noise"
        elif is_camera_noise(self.estimate):
            kind = "camera noise"
        else:
            kind = f"heavy noise that is not white (the camera network removes {self.probe.level * 255:.1f} on flat regions)"
        return f"{kind}, {level}: mitdenoise-camera + non-local means"


def is_camera_noise(estimate: NoiseEstimate) -> bool:
    """Whether the estimate reads as a camera's noise (:data:`CAMERA_CORRELATION`,
    :data:`CAMERA_WHITE_SIGMA`)."""
    return estimate.correlation >= CAMERA_CORRELATION and estimate.white_sigma < CAMERA_WHITE_SIGMA


def plan_for(estimate: NoiseEstimate | None, probe: Probe | None = None, risks: dict[str, Risk] | None = None) -> Plan:
    """The route's choice for an image with this noise estimate and what the probe read
    (:func:`probe`; None: not read): on a camera's noise it caps the second stage's ``h``, on the
    light path it finds heavy noise that is not white. The heavy-white path does not use it. On the
    light path the network whose ``risks`` (:func:`light_risks`) are least runs at their strength;
    without them (nothing to ask), ``mitdenoise-mild`` whole."""
    if estimate is None:
        return Plan("white", 1.0, "none", 0.0, None)
    if is_camera_noise(estimate):
        h = CAMERA_H_PER_SIGMA * estimate.sigma
        if probe is not None:
            h = min(h, CAMERA_H_PER_PROBE * probe.level)
        return Plan("camera", 1.0, "input", float(np.clip(h, *CAMERA_H_RANGE)), estimate, probe)
    if estimate.white_sigma >= HEAVY_SIGMA:
        return Plan("camera", 1.0, "output", HEAVY_WHITE_H, estimate)
    if probe is not None and probe.level >= NON_WHITE_LEVEL:
        bar = min(np.interp(probe.evenness, NON_WHITE_EVENNESS, NON_WHITE_BAR_BY_EVENNESS),
                  np.interp(probe.level, NON_WHITE_HEAVY_LEVELS, (NON_WHITE_BAR_BY_EVENNESS[0], NON_WHITE_LOWEST_BAR)))
        if probe.level >= bar * estimate.white_sigma:
            return Plan("camera", 1.0, "input", probe.level, estimate, probe)
    if not risks:
        return Plan("white", 1.0, "none", 0.0, estimate, probe)
    role = min(risks, key=lambda r: risks[r].error)
    return Plan(role, risks[role].strength, "none", 0.0, estimate, probe, risks)


def plan_image(pixels: np.ndarray, networks: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None) -> Plan:
    """Estimate the noise of float (H, W, C) pixels in [0, 1] and plan from it. With ``networks``
    (``"white"`` and ``"camera"`` as functions on such pixels, as :func:`run_plan` takes them) it
    asks them first: the camera network where the plan is the light path, or the camera path with
    ``h`` above its floor (:func:`probe`); then, where the light path stands, both what they would
    err by (:func:`light_risks`)."""
    if min(pixels.shape[:2]) < WEAK_TEXTURE_PATCH:
        return plan_for(None)
    estimate = estimate_noise(pixels)
    plan = plan_for(estimate)
    if networks is None:
        return plan
    holds_h = plan.second_stage == "input" and plan.h > CAMERA_H_RANGE[0]  # the hold could lower h
    read = probe(pixels, networks["camera"]) if plan.second_stage == "none" or holds_h else None
    plan = plan_for(estimate, read)
    if plan.second_stage == "none":
        plan = plan_for(estimate, read, light_risks(pixels, networks))
    return plan


def stein_terms(noisy: np.ndarray, output: np.ndarray, nudged_output: np.ndarray, nudge: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """The three means Stein's unbiased risk estimate (SURE) is made of, for a denoiser ``f`` on
    ``noisy`` under independent Gaussian noise of ``variance`` (per channel or per pixel: anything
    that broadcasts to the image): ``[mean((f(y) - y)^2), mean(v), mean(v * df_i/dy_i)]``, how far
    ``f`` moved its input, the noise, and how much of the noise it passes on. The derivatives are
    read at random: ``nudged_output`` is ``f(noisy + nudge)`` for a small Gaussian ``nudge``, and
    ``nudge * (nudged_output - output)`` over the nudge's variance averages to them."""
    weights = np.broadcast_to(np.asarray(variance, np.float64), noisy.shape)
    step = float(np.mean(np.square(nudge, dtype=np.float64)))
    passed = float(np.mean(weights * nudge * (nudged_output - output), dtype=np.float64)) / step if step > 0 else 0.0
    return np.array([np.mean(np.square(output - noisy, dtype=np.float64)), weights.mean(), passed])


def least_risk(terms: np.ndarray) -> Risk:
    """The strength ``s`` whose ``noisy + s * (f(noisy) - noisy)`` errs least by Stein's estimate,
    from :func:`stein_terms` ``[A, V, D]``: the estimate is ``A s^2 - V + 2 (1 - s) V + 2 s D``
    (the mean square error against the clean image, in expectation), lowest at ``s = (V - D) / A``
    within [0, 1]."""
    moved, noise, passed = (float(t) for t in terms)
    strength = float(np.clip((noise - passed) / moved, 0, 1)) if moved > 0 else 0.0
    return Risk(strength, moved * strength**2 - noise + 2 * (1 - strength) * noise + 2 * strength * passed)


def light_risks(pixels: np.ndarray, networks: dict[str, Callable[[np.ndarray], np.ndarray]], seed: int = 0) -> dict[str, Risk]:
    """:func:`least_risk` of each network on :func:`risk_tiles` (their terms pooled), under the white
    noise each tile's colour channels read (:func:`~mitdenoise.noise.white_noise_variances`). The
    nudge is Gaussian, :data:`RISK_STEP` a value, drawn from ``seed``: an image gets the same choice
    each time."""
    tiles = [np.ascontiguousarray(pixels[rows, cols]) for rows, cols in risk_tiles(pixels)]
    rng = np.random.default_rng(seed)
    nudges = [(RISK_STEP * rng.standard_normal(t.shape)).astype(np.float32) for t in tiles]
    variances = [white_noise_variances(t) for t in tiles]
    sizes = np.array([t.size for t in tiles], np.float64)
    risks = {}
    for role, network in networks.items():
        terms = [stein_terms(t, np.asarray(network(t), np.float32), np.asarray(network(t + n), np.float32), n, v)
                 for t, n, v in zip(tiles, nudges, variances)]
        risks[role] = least_risk(np.average(terms, axis=0, weights=sizes))
    return risks


def _tile_grid(pixels: np.ndarray, side: int) -> list[tuple[slice, slice]]:
    """The image's grid of whole tiles of ``side`` (of the image's side where it is smaller), in
    reading order."""
    h, w = pixels.shape[:2]
    th, tw = min(h, side), min(w, side)
    return [(slice(top, top + th), slice(left, left + tw)) for top in range(0, h - th + 1, th) for left in range(0, w - tw + 1, tw)]


def risk_tiles(pixels: np.ndarray) -> list[tuple[slice, slice]]:
    """Up to :data:`RISK_TILES` tiles of the image's grid of side :data:`RISK_TILE`, spread evenly
    over it in reading order (the whole image where it is no larger)."""
    grid = _tile_grid(pixels, RISK_TILE)
    return [grid[i] for i in np.unique(np.linspace(0, len(grid) - 1, min(RISK_TILES, len(grid))).round().astype(int))]


def _block_rows(x: np.ndarray, b: int = PROBE_BLOCK) -> np.ndarray:
    """(H, W, C) -> (blocks, b * b * C): the whole b x b blocks of ``x``, row by row."""
    h, w, c = (x.shape[0] // b) * b, (x.shape[1] // b) * b, x.shape[2]
    return x[:h, :w].reshape(h // b, b, w // b, b, c).transpose(0, 2, 1, 3, 4).reshape((h // b) * (w // b), b * b * c)


def _gradients(x: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (H, W, 1): absolute horizontal plus vertical difference, summed over channels."""
    x = np.asarray(x, np.float32)
    grad = np.abs(np.diff(x, axis=0, append=x[-1:])).sum(2) + np.abs(np.diff(x, axis=1, append=x[:, -1:])).sum(2)
    return grad[..., None]


def _gradient_energy(x: np.ndarray) -> np.ndarray:
    """The mean of :func:`_gradients` over each 16x16 block (:data:`PROBE_BLOCK`)."""
    return _block_rows(_gradients(x)).mean(1)


def _median_gradient(x: np.ndarray, b: int) -> np.ndarray:
    """The median of :func:`_gradients` over each b x b block: low on a flat block with a few spikes."""
    return np.median(_block_rows(_gradients(x), b), axis=1)


def _first_share(a: np.ndarray, share: float) -> np.ndarray:
    """The first ``share`` of ``a`` (at least one element): of an ordering, the flattest or the most
    textured blocks."""
    return a[: max(1, int(len(a) * share))]


def probe_tiles(pixels: np.ndarray) -> list[tuple[slice, slice]]:
    """Up to :data:`PROBE_TILES` tiles of side :data:`PROBE_TILE` (the whole image where it is no
    larger): of the image's grid of tiles, those whose flattest tenth of blocks is flattest."""
    grid = _tile_grid(pixels, PROBE_TILE)
    if len(grid) <= 1:
        return grid
    energy = _gradient_energy(pixels)
    per_row = pixels.shape[1] // PROBE_BLOCK
    scores = []
    for rows, cols in grid:
        blocks = np.arange(rows.start // PROBE_BLOCK, rows.stop // PROBE_BLOCK)[:, None] * per_row
        blocks = energy[(blocks + np.arange(cols.start // PROBE_BLOCK, cols.stop // PROBE_BLOCK)).ravel()]
        scores.append(_first_share(np.sort(blocks), PROBE_FLAT_SHARE).mean())
    return [grid[i] for i in sorted(np.argsort(scores, kind="stable")[:PROBE_TILES])]


def probe(pixels: np.ndarray, camera: Callable[[np.ndarray], np.ndarray]) -> Probe:
    """What the camera network removes on :func:`probe_tiles`, read on 16x16 blocks: its level, the
    rms of the change on the flattest tenth of blocks by the output's gradients (noise reads as
    itself there, white or not; a clean photo reads low unless it has no flat region at all), and
    its evenness (:data:`PROBE_TEXTURED_SHARE`). The pixels must hold one whole block at least."""
    changes, output_energies, input_energies = [], [], []
    for rows, cols in probe_tiles(pixels):
        tile = np.ascontiguousarray(pixels[rows, cols])
        out = np.asarray(camera(tile), np.float32)
        changes.append(np.square(_block_rows(out - tile)).mean(1))
        output_energies.append(_gradient_energy(out))
        input_energies.append(_gradient_energy(tile))
    change = np.concatenate(changes)
    by_output = np.argsort(np.concatenate(output_energies), kind="stable")
    level = float(np.sqrt(change[_first_share(by_output, PROBE_FLAT_SHARE)].mean()))
    if len(change) * PROBE_FLAT_SHARE < 1:  # the flattest tenth would be one block, or all of them
        return Probe(level, 0.0)
    by_texture = np.argsort(np.concatenate(input_energies), kind="stable")
    on_flat = float(change[_first_share(by_texture, PROBE_FLAT_SHARE)].mean())
    on_textured = float(change[_first_share(by_texture[::-1], PROBE_TEXTURED_SHARE)].mean())
    if on_textured == 0:
        return Probe(level, 0.0 if on_flat == 0 else float("inf"))
    return Probe(level, on_flat / on_textured)


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
    np.clip(out, 0, 1, out=out)
    return limit_change_to_noise(pixels, out)


class NoiseLine(NamedTuple):
    """The noise a route removed, read where the image is flat (:func:`noise_line`)."""

    intercept: float
    slope: float
    """Its variance at brightness ``x`` ([0, 1] scale): ``intercept + slope * x``, both >= 0."""
    kurtosis: float
    """``E[n^4] / E[n^2]^2`` of the change there, each band scaled to unit variance: 3 for
    Gaussian noise, far more for sparse impulses."""


def noise_line(noisy: np.ndarray, output: np.ndarray) -> NoiseLine | None:
    """The variance of the noise removed from ``noisy``, as a line over brightness (the mean of the
    channels), fitted on the blocks flattest in ``noisy`` in each band of brightness
    (:data:`NOISE_MODEL_BLOCK`). A line because a sensor's noise is one: read noise plus shot
    noise that grows with the light. None for an image without one whole block."""
    b = NOISE_MODEL_BLOCK
    changes = _block_rows(output - noisy, b)
    if changes.size == 0:
        return None
    power = np.square(changes).mean(1)
    flatness, brightness = _median_gradient(noisy, b), _block_rows(output, b).mean(1)
    xs, vs, scaled = [], [], []
    for band in np.array_split(np.argsort(brightness, kind="stable"), NOISE_MODEL_BANDS):
        if band.size:
            flat = band[_first_share(np.argsort(flatness[band], kind="stable"), NOISE_MODEL_FLAT_SHARE)]
            xs.append(brightness[flat].mean())
            vs.append(power[flat].mean())
            scaled.append(changes[flat].ravel() / np.sqrt(vs[-1]) if vs[-1] > 0 else changes[flat].ravel())
    xs, vs, scaled = np.asarray(xs, np.float64), np.asarray(vs, np.float64), np.concatenate(scaled).astype(np.float64)
    second = np.square(scaled).mean()
    kurtosis = float(np.square(np.square(scaled)).mean() / second**2) if second > 0 else 3.0
    if xs.size < 2 or np.ptp(xs) == 0:
        return NoiseLine(float(vs.mean()), 0.0, kurtosis)
    slope, intercept = np.polyfit(xs, vs, 1)
    if slope < 0:
        return NoiseLine(float(vs.mean()), 0.0, kurtosis)
    if intercept < 0:
        return NoiseLine(0.0, float((vs * xs).sum() / (xs * xs).sum()), kurtosis)
    return NoiseLine(float(intercept), float(slope), kurtosis)


def _local_mean(x: np.ndarray, size: int) -> np.ndarray:
    """The mean of (H, W) ``x`` over the ``size`` x ``size`` window around each pixel (edges mirrored)."""
    if min(x.shape) <= size:
        return np.full_like(x, x.mean())
    low, high = size // 2, size - 1 - size // 2
    t = torch.from_numpy(np.ascontiguousarray(x, np.float32))[None, None]
    return torch.nn.functional.avg_pool2d(torch.nn.functional.pad(t, (low, high, low, high), mode="reflect"), size, stride=1)[0, 0].numpy()


def limit_change_to_noise(noisy: np.ndarray, output: np.ndarray) -> np.ndarray:
    """Shrink the change from ``noisy`` to ``output`` where it is more than noise; in place on ``output``.

    Each pixel keeps the share ``min(1, margin * v / m)`` of its change: ``v`` the noise variance
    at its brightness (:func:`noise_line`), ``m`` the mean square of the change around it
    (:data:`CHANGE_WINDOW`). For a change that is the noise plus detail lost with it, that share
    is Wiener's: the result's error is below both the input's noise and the detail lost, so a
    network that smooths texture gives most of it back, continuously, with no threshold to fall
    off, and a clean photo stays close to itself. An image too small to read is left as it is.
    """
    line = noise_line(noisy, output)
    if line is None:
        return output
    window = CHANGE_WINDOW * CHANGE_WINDOW * output.shape[2]
    margin = CHANGE_MARGIN * (1 + CHANGE_MARGIN_ERRORS * np.sqrt(max(line.kurtosis - 1, 0) / window))
    change = output - noisy
    brightness = _local_mean(output.mean(2), NOISE_MODEL_BLOCK)
    allowed = np.multiply(brightness, line.slope * margin, out=brightness)
    allowed += line.intercept * margin
    spread = _local_mean(np.square(change).mean(2), CHANGE_WINDOW)
    share = np.divide(allowed, spread, out=np.ones_like(allowed), where=spread > allowed)
    change *= share[..., None]
    return np.add(noisy, change, out=output)
