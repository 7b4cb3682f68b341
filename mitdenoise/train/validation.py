"""Validation during training: PSNR of the EMA model on seeded synthetic noise and on given pairs.

Clean images get the two noises of the paper's tests, drawn from
``numpy.random.default_rng(seed)`` so every validation of every run sees the same
noisy inputs: Gaussian sigma 15 (the training noise), Poisson alpha 2 (an
unseen noise: the generalisation the method is about) and a camera's noise
(:mod:`mitdenoise.camera`, scored against its clean twin). Noisy inputs are rounded
to 8 bits like the files a user would give; outputs are rounded to 8 bits before
PSNR, like the authors' evaluation (RGB, per-image PSNR averaged). The noise models
are those of :mod:`mitdenoise.noise`, the PSNR that of :mod:`mitdenoise.metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..imageio import center_crop, read_rgb8, round_to_uint8, to_float
from ..metrics import psnr
from ..noise import camera_pair, gaussian, poisson
from ..errors import TrainDataError
from .data import find_images


@dataclass
class ValSet:
    """Noisy inputs (uint8) and clean references (uint8), (H, W, 3) each, under a log name."""

    name: str
    noisy: list[np.ndarray]
    clean: list[np.ndarray]

    @property
    def noisy_psnr(self) -> float:
        return float(np.mean([psnr(n, c) for n, c in zip(self.noisy, self.clean)]))


VAL_CAMERA_LEVEL = 4.0
"""The camera-noise validation set's level (``mitdenoise.camera``): a phone indoors."""


def synthetic_sets(clean_dir: str | Path, limit: int, crop: int, seed: int) -> list[ValSet]:
    """``gaussian15``, ``poisson2`` and ``camera4`` sets from the first ``limit`` images of ``clean_dir``."""
    clean = [center_crop(read_rgb8(p), crop) for p in find_images(clean_dir)[:limit]]
    floats = [to_float(c, np.float64) for c in clean]
    rng = np.random.default_rng(seed)
    gauss = [round_to_uint8(gaussian(x, 15.0, rng)) for x in floats]
    rng = np.random.default_rng(seed)
    pois = [round_to_uint8(poisson(x, 2.0, rng)) for x in floats]
    rng = np.random.default_rng(seed)
    pairs = [camera_pair(x, VAL_CAMERA_LEVEL, rng) for x in floats]
    camera = ValSet(f"camera{VAL_CAMERA_LEVEL:g}", [round_to_uint8(n) for n, _ in pairs], [round_to_uint8(c) for _, c in pairs])
    return [ValSet("gaussian15", gauss, clean), ValSet("poisson2", pois, clean), camera]


def pair_set(spec: str, limit: int, crop: int) -> ValSet:
    """``NOISY_DIR:CLEAN_DIR``: files with the same name (stem) in both folders."""
    noisy_dir, clean_dir = spec.rsplit(":", 1)
    clean_by_stem = {p.stem: p for p in find_images(clean_dir)}
    pairs = [(p, clean_by_stem[p.stem]) for p in find_images(noisy_dir) if p.stem in clean_by_stem][:limit]
    if not pairs:
        raise TrainDataError(f"no file names in common between {noisy_dir} and {clean_dir}")
    noisy, clean = [], []
    for noisy_path, clean_path in pairs:
        n, c = read_rgb8(noisy_path), read_rgb8(clean_path)
        if n.shape != c.shape:
            raise TrainDataError(f"{noisy_path} is {n.shape[1]}x{n.shape[0]} but {clean_path} is {c.shape[1]}x{c.shape[0]}")
        noisy.append(center_crop(n, crop))
        clean.append(center_crop(c, crop))
    return ValSet("pairs", noisy, clean)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, sets: list[ValSet], device: torch.device, seed: int = 0) -> dict[str, float]:
    """Mean PSNR per set of ``model`` (fp32, attention mask drawn from ``seed``): ``{"psnr_<name>": dB}``."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    results = {}
    for val in sets:
        scores = []
        for noisy, clean in zip(val.noisy, val.clean):
            x = torch.tensor(noisy, device=device).permute(2, 0, 1)[None].float().div_(255.0)  # a copy: cached arrays are read-only
            y = model(x, generator=generator).clamp_(0, 1)
            out = y[0].permute(1, 2, 0).mul_(255.0).round_().to(torch.uint8).cpu().numpy()
            scores.append(min(psnr(out, clean), 100.0))  # identical images: inf, which JSON can't hold
        results[f"psnr_{val.name}"] = round(float(np.mean(scores)), 4)
    model.train(was_training)
    return results
