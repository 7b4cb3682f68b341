"""The route's sweep: ``mitdenoise-auto`` against the better of its own two networks alone, for
every kind of noise of the noise matrix at four levels each, on small crops of McMaster, Kodak24
and CBSD68.

A cell fails where the route's mean PSNR is more than 0.3 dB under the better network's. The cells
the route still trails are listed as strict expected failures: one that starts passing fails the
suite too, so the list can only shrink."""

import numpy as np
import pytest
import torch

from mitdenoise import Denoiser, adaptive
from mitdenoise.bench.quality import list_images, noisy_version
from mitdenoise.imageio import center_crop, from_float, read_rgb8, to_float
from mitdenoise.metrics import psnr

from conftest import DATA, need_shared

CROP = 128
IMAGES_PER_SET = 2
MARGIN = 0.3
LEVELS = {
    "gaussian": (3, 8, 15, 25),
    "camera": (1, 2, 4, 8),
    "poissongaussian": (3, 8, 15, 25),
    "correlated": (3, 8, 15, 25),
    "gaussianjpeg": (3, 8, 15, 25),
}
TRAILING = {("correlated", 8), ("gaussianjpeg", 8), ("gaussianjpeg", 15)}
"""Cells where the route is still more than 0.3 dB under its better network on these crops
(docs/benchmarks.md, "the noise matrix", has the same kinds and levels on larger crops, where
other cells trail). The closest, Gaussian + JPEG 8, is about 0.15 dB past the margin."""


def _cells() -> list:
    trailing = pytest.mark.xfail(strict=True, reason="the route trails its better network here")
    return [pytest.param(kind, level, marks=[trailing] if (kind, level) in TRAILING else [], id=f"{kind}:{level}")
            for kind, levels in LEVELS.items() for level in levels]


class _RecentOutputs:
    """A network as a function on float pixels that remembers its outputs for the last two inputs:
    the route's probe and its light path's risks (whose tile is the whole small crop, and the crop
    nudged), its plan and the network alone call it on the same crop one after another, and it
    runs once a crop and nudge."""

    def __init__(self, name: str):
        self.denoiser = Denoiser(name, device="cpu", seed=0)
        self._recent: list[tuple[bytes, np.ndarray]] = []

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        key = pixels.tobytes() + bytes(str(pixels.shape), "ascii")
        for known, output in self._recent:
            if known == key:
                return output.copy()
        output = np.asarray(self.denoiser.denoise_array(pixels.copy()), np.float32)
        self._recent = [*self._recent[-1:], (key, output)]
        return output.copy()


@pytest.fixture(scope="module")
def networks():
    return {"camera": _RecentOutputs("mitdenoise-camera"), "white": _RecentOutputs("mitdenoise-mild")}


@pytest.fixture(scope="module")
def crops():
    data = need_shared(DATA)
    return [center_crop(read_rgb8(f), CROP) for name in ("mcmaster", "kodak24", "cbsd68")
            for f in list_images(data / "test" / name)[:IMAGES_PER_SET]]


@pytest.mark.parametrize("kind, level, light", [("correlated", 8, False), ("gaussian", 8, True)])
def test_the_sweep_runs_the_route_as_the_denoiser_does(networks, crops, kind, level, light):
    """The sweep calls the route's parts (:func:`adaptive.plan_image`, :func:`adaptive.run_plan`)
    to share the networks' outputs; on a crop they give what ``mitdenoise-auto`` gives, on the
    camera path and on the light path."""
    noisy, _ = noisy_version(crops[0], kind, level, 0, 0)
    x = to_float(noisy, np.float32)
    plan = adaptive.plan_image(x, networks)
    assert (plan.second_stage == "none") == light
    ours = from_float(adaptive.run_plan(plan, x, networks, torch.device("cpu")), np.uint8)
    auto = Denoiser("mitdenoise-auto", device="cpu", seed=0)
    assert np.array_equal(ours, auto(noisy)) and auto.last_plan == plan


@pytest.mark.slow
@pytest.mark.parametrize("kind, level", _cells())
def test_the_route_is_never_far_under_its_better_network(networks, crops, kind, level):
    scores = {"route": [], "camera": [], "white": []}
    for i, crop in enumerate(crops):
        noisy, clean = noisy_version(crop, kind, level, 0, i)
        x = to_float(noisy, np.float32)
        plan = adaptive.plan_image(x, networks)
        scores["route"].append(psnr(from_float(adaptive.run_plan(plan, x, networks, torch.device("cpu")), np.uint8), clean))
        for role in ("camera", "white"):
            scores[role].append(psnr(from_float(networks[role](x), np.uint8), clean))
    route, best = np.mean(scores["route"]), max(np.mean(scores["camera"]), np.mean(scores["white"]))
    assert route >= best - MARGIN, f"{kind}:{level}: the route {route:.2f} dB, its better network {best:.2f}"
