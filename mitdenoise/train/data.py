"""Training patches: clean images decoded once into RAM, crops drawn from a seed.

Every patch is a pure function of ``(seed, step, index in the global batch)``:
which image, where the crop is, which of the 8 flip/rot90 modes, the noise and the
input mask. So a resumed run sees exactly the batches an uninterrupted one would,
with or without DataLoader workers, and under torchrun rank ``r`` simply builds
its own slice of the global batch (different crops on every rank, and the same
global batch whatever the number of ranks).
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .. import camera, imageio
from .. import noise as noises
from ..errors import TrainDataError
from ..masking import input_mask, ramped

IMAGE_SUFFIXES = imageio.SUPPORTED_SUFFIXES


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted so runs are reproducible."""
    root = Path(folder)
    if not root.is_dir():
        raise TrainDataError(f"image folder not found: {root}")
    paths = imageio.image_files(root, recursive=True)
    if not paths:
        raise TrainDataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return paths


def load_images(paths: list[Path], min_size: int = 1, threads: int | None = None) -> tuple[list[np.ndarray], int]:
    """Decode all images (in threads: decoders release the GIL); drop those smaller than ``min_size``.

    Returns the kept images and how many were too small.
    """
    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(imageio.read_rgb8, paths))
    kept = [im for im in images if im.shape[0] >= min_size and im.shape[1] >= min_size]
    if not kept:
        raise TrainDataError(f"all {len(images)} images are smaller than the {min_size}x{min_size} patch")
    return kept, len(images) - len(kept)


def augment(x: torch.Tensor, mode: int) -> torch.Tensor:
    """One of the 8 flip/rot90 modes on the last two dims: rotate ``mode % 4`` quarter turns, then mirror if ``mode >= 4``."""
    x = torch.rot90(x, mode % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if mode >= 4 else x


def augment_inverse(x: torch.Tensor, mode: int) -> torch.Tensor:
    """Undo :func:`augment` with the same ``mode``."""
    if mode >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, -(mode % 4), dims=(-2, -1))


BROAD_MARGIN = 8
"""Extra pixels drawn around a patch for the broad recipe: the demosaic's filters and JPEG's 8x8
blocks see past the patch's edge, and the patch's offset in the block grid is drawn."""
BROAD_KINDS = (("camera", 0.40), ("gaussian", 0.20), ("poissongaussian", 0.15), ("correlated", 0.15),
               ("mixture", 0.10))
"""The broad recipe's noise kinds and their shares of the patches."""
BROAD_CAMERA_LEVEL = (0.25, 16.0)
"""Camera noise levels (``mitdenoise.camera``), drawn log-uniformly: from a base-ISO DSLR's
(noisy about 45 dB) to a phone's at night (about 16 dB)."""
BROAD_WHITE_SIGMA = (0.0, 50.0)
BROAD_POISSON_GAUSSIAN = (0.0, 40.0)
BROAD_CORRELATED_SIGMA = (1.0, 30.0)
BROAD_JPEG_SHARE = 0.3
"""Share of the non-camera patches JPEG-compressed after the noise, at a quality from
``BROAD_JPEG_QUALITY``; the target stays the clean patch."""
BROAD_JPEG_QUALITY = (50, 95)


def min_image_size(config) -> int:
    """The smallest image side a run's patches can be cut from (``TrainConfig``)."""
    return config.patch_size + (2 * BROAD_MARGIN if config.broad_noise else 0)


def broad_noise(x: np.ndarray, rng: np.random.Generator, generator: torch.Generator,
                clip: bool) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, target) for a clean (H, W, 3) float64 patch: one noise of the broad recipe.

    Kinds by ``BROAD_KINDS``: a camera's pipeline (``mitdenoise.camera``: the target is its
    clean twin), white Gaussian, Poisson-Gaussian, camera-structured correlated Gaussian
    (:func:`~mitdenoise.noise.structured_noise`), or a mixture of white and correlated in a drawn order of
    size; then, for all but the camera, JPEG with ``BROAD_JPEG_SHARE``. ``clip`` clips
    uncompressed additive noise to [0, 1] (JPEG and the camera always clip).
    """
    kinds, shares = zip(*BROAD_KINDS)
    kind = kinds[int(rng.choice(len(kinds), p=np.array(shares) / sum(shares)))]
    if kind == "camera":
        level = float(np.exp(rng.uniform(*np.log(BROAD_CAMERA_LEVEL))))
        return camera.camera_pair(x, camera.draw_camera(level, rng), rng)
    size = x.shape[0]
    if kind == "gaussian":
        noise = rng.normal(0.0, rng.uniform(*BROAD_WHITE_SIGMA) / 255.0, x.shape)
    elif kind == "poissongaussian":
        noise = noises.poisson_gaussian_std(x, rng.uniform(*BROAD_POISSON_GAUSSIAN)) * rng.standard_normal(x.shape)
    elif kind == "correlated":
        noise = _structured_field(size, rng.uniform(*BROAD_CORRELATED_SIGMA), generator)
    else:
        white, blotch = rng.uniform(0.0, 25.0), rng.uniform(1.0, 15.0)
        noise = rng.normal(0.0, white / 255.0, x.shape) + _structured_field(size, blotch, generator)
    noisy = x + noise
    if rng.random() < BROAD_JPEG_SHARE:
        return camera.jpeg(np.clip(noisy, 0.0, 1.0), int(rng.integers(BROAD_JPEG_QUALITY[0], BROAD_JPEG_QUALITY[1] + 1))), x
    return (np.clip(noisy, 0.0, 1.0) if clip else noisy), x


def _structured_field(size: int, sigma255: float, generator: torch.Generator) -> np.ndarray:
    return noises.structured_noise(size, sigma255 / 255.0, generator).permute(1, 2, 0).double().numpy()


class PatchBatches(Dataset):
    """Item ``step`` is this rank's share of the global batch of that step: (noisy+masked, clean), (B, 3, P, P) float32."""

    def __init__(
        self,
        images: list[np.ndarray],
        *,
        patch_size: int,
        batch_size: int,
        steps: int,
        seed: int,
        noise_sigma: float | tuple[float, float],
        mask_ratio: tuple[int, int],
        clip_noisy: bool = True,
        correlated_share: float = 0.0,
        correlated_sigma: tuple[float, float] = (1.0, 15.0),
        mask_ramp: int = 0,
        broad: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the {world_size} processes")
        self.images = images
        self.patch_size = patch_size
        self.per_rank = batch_size // world_size
        self.first = rank * self.per_rank
        self.steps = steps
        self.seed = seed
        low, high = noise_sigma if isinstance(noise_sigma, (tuple, list)) else (noise_sigma, noise_sigma)
        self.sigma_range = (low / 255.0, high / 255.0)
        self.mask_ratio = tuple(mask_ratio)
        self.clip_noisy = clip_noisy
        self.correlated_share = correlated_share
        self.correlated_sigma = (correlated_sigma[0] / 255.0, correlated_sigma[1] / 255.0)
        self.mask_ramp = mask_ramp
        self.broad = broad

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.patch(step, self.first + i) for i in range(self.per_rank)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def patch(self, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch ``index`` of the global batch of ``step``: the authors' recipe, in their order."""
        g = torch.Generator().manual_seed(noises.derive_seed(self.seed, step, index))
        image = self.images[int(torch.randint(len(self.images), (1,), generator=g))]
        if self.broad:
            return self._broad_patch(image, step, index, g)
        h, w = image.shape[:2]
        p = self.patch_size
        top = int(torch.randint(h - p + 1, (1,), generator=g))
        left = int(torch.randint(w - p + 1, (1,), generator=g))
        mode = int(torch.randint(8, (1,), generator=g))
        crop = torch.from_numpy(np.ascontiguousarray(image[top : top + p, left : left + p]))
        clean = augment(crop.permute(2, 0, 1).float().div_(255.0), mode).contiguous()
        if self.correlated_share and float(torch.rand((), generator=g)) < self.correlated_share:
            noisy = clean + noises.structured_noise(p, noises.uniform_draw(g, *self.correlated_sigma), g)
        else:
            sigma = noises.uniform_draw(g, *self.sigma_range)
            noisy = clean + torch.randn(clean.shape, generator=g) * sigma if sigma else clean.clone()
        if self.clip_noisy:
            noisy = noisy.clamp_(0.0, 1.0)
        noisy = input_mask(noisy, ramped(self.mask_ratio, step, self.mask_ramp), generator=g)
        return noisy, clean

    def _broad_patch(self, image: np.ndarray, step: int, index: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A patch of the broad recipe (:func:`broad_noise`), drawn with a margin and cropped at a drawn offset."""
        rng = np.random.default_rng(noises.derive_seed(self.seed, step, index, 1))
        p, margin = self.patch_size, BROAD_MARGIN
        big = p + 2 * margin
        h, w = image.shape[:2]
        top, left = int(rng.integers(h - big + 1)), int(rng.integers(w - big + 1))
        crop = torch.from_numpy(np.ascontiguousarray(image[top : top + big, left : left + big]))
        x = imageio.to_float(augment(crop.permute(2, 0, 1), int(rng.integers(8))).permute(1, 2, 0).numpy(), np.float64)
        noisy, target = broad_noise(x, rng, g, self.clip_noisy)
        dy, dx = (int(v) for v in rng.integers(2 * margin + 1, size=2))
        noisy_t, clean_t = (torch.from_numpy(np.ascontiguousarray(a[dy : dy + p, dx : dx + p].transpose(2, 0, 1))).float()
                            for a in (noisy, target))
        noisy_t = input_mask(noisy_t, ramped(self.mask_ratio, step, self.mask_ramp), generator=g)
        return noisy_t, clean_t


def _ignore_stop_signals(_worker_id: int) -> None:
    # Ctrl-C, and SIGTERM from `timeout` or a job scheduler, reach the whole process group: the main
    # process saves and stops, and workers must carry on until then (a killed worker would crash the
    # run mid-step, without a checkpoint). Orphaned workers still exit: the DataLoader's watchdog
    # ends them when the main process is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset: PatchBatches, start: int, workers: int, pin_memory: bool) -> DataLoader:
    """Batches for steps ``start, start+1, ...`` in order; ``workers`` processes build them ahead."""
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=range(start, len(dataset)),
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        worker_init_fn=_ignore_stop_signals if workers else None,
    )
