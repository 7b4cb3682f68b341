"""Benchmarks: how well (PSNR/SSIM per noise and method) and how fast (MP/s, memory).

Quality (:func:`run_quality`): clean images get synthetic noise (seeded per image
and noise, so the numbers don't depend on order), or given noisy/clean pairs are
used as they are; every method denoises the same noisy images; the mean PSNR and
SSIM (RGB, 8-bit, like the paper; Y of YCbCr too) go into ``results.json`` and
``results.md``, and one picture grid per noise row into PNGs.

Methods: model checkpoints (through :class:`~mitdenoise.denoiser.Denoiser`), the same
with several averaged attention-mask draws, the noisy input itself, OpenCV non-local
means and BM3D (the optional ``bm3d`` package). The classical methods need the noise
level: it is estimated from each noisy image (:func:`mitdenoise.noise.estimate_sigma`)
unless ``oracle_sigma`` gives them the true sigma of Gaussian noise.

Speed (:func:`run_speed`): megapixels per second and peak memory of the tiled
denoiser for sizes x tiles x batch sizes x precisions x devices, side by side with
the straightforward reference (whole image, one forward pass, attention mask drawn
with NumPy on the host per layer, as the authors' code does), and the machine's
sgemm rate as a practical ceiling for the network's 959,445 multiply-adds per pixel.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import noise as noises
from .metrics import psnr, ssim

MACS_PER_PIXEL_RELEASED = 959_445
"""Multiply-adds per pixel of the released network (see shared fixtures README): 1.92 TFLOP per megapixel."""
BASELINES = ("noisy", "nlm", "bm3d")
DEFAULT_NOISES = "gaussian:15,poisson:2,speckle:0.024,saltpepper:0.002"
NLM_H_PER_SIGMA = 0.7
"""h = hColor = 0.7 sigma (8-bit units): best on average in a sweep of 0.4..1.0 sigma, sigma 10..50."""
GRID_CROP = 128

Progress = Callable[[str], None]
"""Called with a short description after each unit of work (for a progress bar)."""


# --- shared helpers ---------------------------------------------------------------------------


def macs_per_pixel(config) -> int:
    """Multiply-adds per (padded) pixel of a :class:`~mitdenoise.model.ModelConfig`.

    Per Swin block: qkv 3C^2, q@k^T and attn@v N C each (N tokens per window), proj
    C^2, MLP 2 C hidden; per RSTB and after the body a 3conv (9 C C/4 + C^2/16 +
    9 C/4 C) or a 3x3 conv; plus conv_first and conv_last. 959,445 for the released config.
    """
    c, n = config.embed_dim, config.window_size**2
    hidden = int(c * config.mlp_ratio)
    block = 3 * c * c + 2 * n * c + c * c + 2 * c * hidden
    if config.resi_connection == "3conv":
        conv = 9 * c * (c // 4) + (c // 4) ** 2 + 9 * (c // 4) * c
    else:
        conv = 9 * c * c
    ends = config.conv_first_kernel**2 * config.in_chans * c + 9 * c * config.in_chans
    return sum(config.depths) * block + (len(config.depths) + 1) * conv + ends


def to_unit(pixels: np.ndarray) -> np.ndarray:
    """Integer pixels -> float64 in [0, 1]; floats pass through as float64."""
    if np.issubdtype(pixels.dtype, np.integer):
        return pixels.astype(np.float64) / np.iinfo(pixels.dtype).max
    return pixels.astype(np.float64)


def from_unit(x: np.ndarray, dtype) -> np.ndarray:
    """Float in [0, 1] -> ``dtype``, rounding half up (as ``floor(x * max + 0.5)``) for integers."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        top = np.iinfo(dtype).max
        return np.floor(np.clip(x, 0.0, 1.0) * top + 0.5).astype(dtype)
    return np.clip(x, 0.0, 1.0).astype(dtype)


def to_rgb8(pixels: np.ndarray) -> np.ndarray:
    """Any (H, W[, C]) image -> (H, W, 3) uint8 (grey repeated, alpha dropped, 16-bit rounded)."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[2] in (2, 4):
        pixels = pixels[..., :-1]
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    if pixels.dtype != np.uint8:
        pixels = from_unit(to_unit(pixels), np.uint8)
    return np.ascontiguousarray(pixels)


def center_crop(pixels: np.ndarray, size: int | None) -> np.ndarray:
    """The central ``size`` x ``size`` part (or less, where the image is smaller)."""
    if not size:
        return pixels
    h, w = pixels.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return pixels[top : top + size, left : left + size]


def synthetic_image(height: int = 256, width: int = 256, seed: int = 0) -> np.ndarray:
    """A made-up (H, W, 3) uint8 test image: smooth colour gradients, hard-edged shapes, fine stripes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    img = np.stack(
        [
            0.5 + 0.3 * np.sin(2 * np.pi * (xx + 0.3 * c) * (1 + c)) * np.cos(2 * np.pi * yy * (1 + 0.5 * c))
            for c in range(3)
        ],
        axis=-1,
    )
    for _ in range(6):
        cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
        colour = rng.uniform(0, 1, 3)
        if rng.random() < 0.5:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        else:
            inside = (abs(yy - cy) < r) & (abs(xx - cx) < r * 0.6)
        img[inside] = colour
    stripes = (np.sin(2 * np.pi * xx * 40) > 0) & (yy > 0.8)
    img[stripes] *= 0.6
    return from_unit(img, np.uint8)


def read_rgb8(path: Path) -> np.ndarray:
    from .imageio import read_image

    return to_rgb8(read_image(path).pixels)


def list_images(folder: Path) -> list[Path]:
    """The image files of a folder (the suffixes imageio reads), sorted by name."""
    from .imageio import SUPPORTED_SUFFIXES

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images in {folder}")
    return files


def model_label(spec: str | os.PathLike | None) -> str:
    """A short column name for a model spec: the registry name, the file's stem, or for the files
    ``mitdenoise train`` writes (every run's are named alike) the run folder and the stem."""
    if spec is None:
        from .weights import DEFAULT_MODEL

        return DEFAULT_MODEL
    text = str(spec)
    if "/" in text or os.sep in text or Path(text).suffix.lower() in (".pth", ".pt", ".safetensors"):
        path = Path(text.rstrip("/"))
        if path.name in _RUN_FILES and path.parent.name:
            return f"{path.parent.name}/{path.stem}"
        return path.stem
    return text


_RUN_FILES = ("ema.safetensors", "last.pt")  # mitdenoise.train.loop's EXPORT_NAME and CHECKPOINT_NAME


def _unique(name: str, taken: set[str]) -> str:
    candidate, k = name, 2
    while candidate in taken:
        candidate, k = f"{name}#{k}", k + 1
    taken.add(candidate)
    return candidate


# --- quality: methods ----------------------------------------------------------------------------


@dataclass
class Method:
    """A column: ``run(noisy uint8 (H, W, 3), sigma255) -> uint8 (H, W, 3)``; only nlm/bm3d use sigma."""

    name: str
    kind: str  # "noisy", "model", "nlm", "bm3d"
    run: Callable[[np.ndarray, float], np.ndarray]
    info: dict = field(default_factory=dict)


def model_methods(
    specs: Sequence[str | None], passes: int = 1, taken: set[str] | None = None, **denoiser_options
) -> list[Method]:
    """One column per model spec, plus ``"<name> xN"`` with N averaged mask draws when passes > 1
    (masked models only: a model without the attention mask gives the same output every draw)."""
    from .denoiser import Denoiser
    from .weights import load_model, resolve_model

    taken = set() if taken is None else taken
    methods = []
    for spec in specs:
        net = load_model(resolve_model(spec))
        name = _unique(model_label(spec), taken)
        for n in (1, passes) if passes > 1 and net.config.mask_enabled else (1,):
            den = Denoiser(net, passes=n, **denoiser_options)
            label = name if n == 1 else _unique(f"{name} x{n}", taken)
            info = {"model": str(spec) if spec is not None else None, "passes": n, "device": str(den.device),
                    "precision": den.precision, "tile": den.tile, "seed": den.seed}
            methods.append(Method(label, "model", lambda x, s, d=den: d.denoise_array(x), info=info))
    return methods


def nlm_denoise(noisy: np.ndarray, sigma255: float) -> np.ndarray:
    """OpenCV ``fastNlMeansDenoisingColored`` with h = hColor = 0.7 sigma, 7x7 patches, 21x21 search."""
    import cv2

    h = max(0.5, NLM_H_PER_SIGMA * sigma255)
    bgr = np.ascontiguousarray(noisy[..., ::-1])
    out = cv2.fastNlMeansDenoisingColored(bgr, None, h, h, 7, 21)
    return np.ascontiguousarray(out[..., ::-1])


def bm3d_denoise(noisy: np.ndarray, sigma255: float) -> np.ndarray:
    """``bm3d.bm3d_rgb`` (opponent colour space, default profile) with sigma in [0, 1] units."""
    import bm3d

    z = noisy.astype(np.float64) / 255.0
    out = bm3d.bm3d_rgb(z, max(sigma255, 0.5) / 255.0)
    return from_unit(np.asarray(out), np.uint8)


def baseline_methods(names: Sequence[str], notes: list[str], taken: set[str] | None = None) -> list[Method]:
    """The classical columns that can run here; a missing optional package is a note, not an error."""
    taken = set() if taken is None else taken
    methods = []
    for name in names:
        if name == "noisy":
            methods.append(Method(_unique("noisy", taken), "noisy", lambda x, s: x))
        elif name == "nlm":
            try:
                import cv2  # noqa: F401
            except ImportError:
                notes.append("nlm skipped: OpenCV is not installed (pip install opencv-python-headless)")
                continue
            methods.append(Method(_unique("nlm", taken), "nlm", nlm_denoise, info={"h_per_sigma": NLM_H_PER_SIGMA}))
        elif name == "bm3d":
            try:
                import bm3d  # noqa: F401
            except ImportError:
                notes.append("bm3d skipped: the optional bm3d package is not installed (pip install bm3d)")
                continue
            methods.append(Method(_unique("bm3d", taken), "bm3d", bm3d_denoise))
        else:
            raise ValueError(f"unknown baseline {name!r}: use {', '.join(BASELINES)}")
    return methods


def parse_baselines(text: str) -> list[str]:
    """``"noisy,nlm,bm3d"`` -> list; ``"none"`` or empty -> []."""
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if names == ["none"]:
        return []
    for name in names:
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}: use a comma list of {', '.join(BASELINES)} (or none)")
    return list(dict.fromkeys(names))


# --- quality: data -------------------------------------------------------------------------------


@dataclass
class NoiseRow:
    """One row of the table: a synthetic noise (kind, level) or given noisy images."""

    label: str
    kind: str
    level: float | None
    given: list[np.ndarray] | None = None  # noisy images, for given pairs


def noisy_version(clean: np.ndarray, kind: str, level: float, seed: int, index: int) -> np.ndarray:
    """The noisy uint8 image of row (kind, level) for image ``index``: the same whatever the run order."""
    rng = noises.derived_rng(seed, index, kind, float(level))
    return from_unit(noises.apply_noise(to_unit(clean), kind, level, rng), np.uint8)


def load_quality_data(
    clean_dir: Path | None,
    noisy_dir: Path | None,
    clean_images: Sequence[tuple[str, np.ndarray]] | None,
    limit: int | None,
    crop: int | None,
) -> tuple[list[tuple[str, np.ndarray]], list[np.ndarray] | None]:
    """(name, clean uint8) pairs and, with ``noisy_dir``, the matching noisy images (same file stem)."""
    if clean_images is not None:
        cleans = [(n, to_rgb8(a)) for n, a in clean_images]
        paths = None
    else:
        if clean_dir is None:
            raise ValueError("give a folder of clean images (or clean images directly)")
        paths = list_images(clean_dir)
        cleans = None
    noisy_paths = None
    if noisy_dir is not None:
        noisy_paths = list_images(noisy_dir)
        if paths is None:
            raise ValueError("given noisy images need a clean folder to pair with")
        by_stem = {p.stem: p for p in paths}
        missing = [p.name for p in noisy_paths if p.stem not in by_stem]
        if missing:
            raise FileNotFoundError(f"no clean image in {clean_dir} for {', '.join(missing[:5])}")
        paths = [by_stem[p.stem] for p in noisy_paths]
    if limit is not None:
        paths = paths[:limit] if paths is not None else None
        cleans = cleans[:limit] if cleans is not None else None
        noisy_paths = noisy_paths[:limit] if noisy_paths is not None else None
    if cleans is None:
        cleans = [(p.name, read_rgb8(p)) for p in paths]
    cleans = [(n, np.ascontiguousarray(center_crop(a, crop))) for n, a in cleans]
    given = None
    if noisy_paths is not None:
        given = []
        for (name, clean), path in zip(cleans, noisy_paths):
            noisy = read_rgb8(path)
            if noisy.shape != clean.shape and crop:
                noisy = center_crop(noisy, crop)
            if noisy.shape != clean.shape:
                raise ValueError(f"{path.name}: noisy image is {noisy.shape[:2]}, its clean image {clean.shape[:2]}")
            given.append(np.ascontiguousarray(noisy))
    return cleans, given


# --- quality: run --------------------------------------------------------------------------------


def run_quality(
    clean_dir: str | os.PathLike | None = None,
    *,
    noisy_dir: str | os.PathLike | None = None,
    clean_images: Sequence[tuple[str, np.ndarray]] | None = None,
    noise_spec: str | Sequence[tuple[str, float]] | None = None,
    models: Sequence[str | None] = (None,),
    passes: int = 1,
    baselines: Sequence[str] = BASELINES,
    seed: int = 0,
    limit: int | None = None,
    crop: int | None = None,
    oracle_sigma: bool = False,
    device: str = "auto",
    precision: str = "auto",
    tile: int = 256,
    tile_overlap: int = 32,
    batch_size: int = 1,
    on_progress: Progress | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict:
    """Run every method on every (noise row, image); returns the results as a JSON-ready dict.

    Rows are the synthetic noises of ``noise_spec`` (on the clean images) plus, with
    ``noisy_dir``, a row ``given:<folder>`` of the given noisy images. Synthetic noise
    for image i and noise (kind, level) is seeded by (seed, i, kind, level). Images are
    evaluated as 8-bit RGB. The dict also carries the grid crops under ``"_grids"``
    (arrays; :func:`write_quality_outputs` turns them into PNGs and drops them).
    """
    if isinstance(noise_spec, str):
        noise_list = noises.parse_noise_spec(noise_spec)
    elif noise_spec is None:
        noise_list = noises.parse_noise_spec(DEFAULT_NOISES) if noisy_dir is None else []
    else:
        noise_list = noises.parse_noise_spec(",".join(noises.noise_label(k, float(v)) for k, v in noise_spec))
    cleans, given = load_quality_data(
        Path(clean_dir) if clean_dir is not None else None,
        Path(noisy_dir) if noisy_dir is not None else None,
        clean_images, limit, crop,
    )
    rows = [NoiseRow(noises.noise_label(k, v), k, v) for k, v in noise_list]
    if given is not None:
        rows.append(NoiseRow(f"given:{Path(noisy_dir).name}", "given", None, given))
    if not rows:
        raise ValueError("nothing to evaluate: give noise kinds (e.g. gaussian:15) or a folder of noisy images")

    notes: list[str] = []
    taken: set[str] = set()
    methods = baseline_methods([b for b in baselines if b == "noisy"], notes, taken)
    methods += model_methods(list(models), passes, taken, device=device, precision=precision, tile=tile,
                             tile_overlap=tile_overlap, batch_size=batch_size, seed=seed)
    methods += baseline_methods([b for b in baselines if b != "noisy"], notes, taken)
    if not methods:
        raise ValueError("no methods to run: give --model and/or baselines")
    if on_total:
        on_total(len(rows) * len(cleans) * len(methods))

    out_rows = []
    grids = {}
    for row in rows:
        per_image: dict[str, list[dict]] = {m.name: [] for m in methods}
        seconds = dict.fromkeys(per_image, 0.0)
        sigmas = []
        oracle = oracle_sigma and row.kind in ("gaussian", "correlated")
        grid = None
        for index, (name, clean) in enumerate(cleans):
            noisy = row.given[index] if row.given is not None else noisy_version(clean, row.kind, row.level, seed, index)
            sigma = float(row.level) if oracle else noises.estimate_sigma(noisy / 255.0) * 255.0
            sigmas.append(sigma)
            if index == 0:
                grid = {"noisy": _grid_crop(noisy), "clean": _grid_crop(clean), "methods": {}, "psnr": {}}
            for method in methods:
                start = time.perf_counter()
                result = method.run(noisy, sigma)
                seconds[method.name] += time.perf_counter() - start
                per_image[method.name].append({"image": name, **image_scores(result, clean)})
                if index == 0:
                    grid["methods"][method.name] = _grid_crop(result)
                    grid["psnr"][method.name] = per_image[method.name][-1]["psnr"]
                if on_progress:
                    on_progress(f"{row.label} {method.name} {name}")
        megapixels = sum(c.shape[0] * c.shape[1] for _, c in cleans) / 1e6
        results = {}
        for method in methods:
            scores = per_image[method.name]
            results[method.name] = {key: _mean([s[key] for s in scores]) for key in ("psnr", "ssim", "psnr_y", "ssim_y")}
            results[method.name]["seconds"] = seconds[method.name]
            results[method.name]["s_per_mp"] = seconds[method.name] / megapixels if megapixels else None
        out_rows.append({
            "noise": row.label,
            "kind": row.kind,
            "level": row.level,
            "sigma": {"source": "oracle" if oracle else "estimated", "mean_255": _mean(sigmas)},
            "results": results,
            "per_image": per_image,
        })
        grids[row.label] = grid

    return {
        "schema": "mitdenoise.bench.quality/1",
        "config": {
            "seed": seed, "limit": limit, "crop": crop, "oracle_sigma": oracle_sigma, "passes": passes,
            "models": [None if m is None else str(m) for m in models], "baselines": list(baselines),
            "clean_dir": None if clean_dir is None else str(clean_dir),
            "noisy_dir": None if noisy_dir is None else str(noisy_dir),
            "device": device, "precision": precision, "tile": tile, "tile_overlap": tile_overlap,
            "batch_size": batch_size, "nlm_h_per_sigma": NLM_H_PER_SIGMA,
            "metrics": "8-bit RGB PSNR/SSIM; psnr_y/ssim_y on BT.601 Y (BasicSR rgb2ycbcr), no border crop",
        },
        "images": [name for name, _ in cleans],
        "methods": [{"name": m.name, "kind": m.kind, **m.info} for m in methods],
        "rows": out_rows,
        "notes": notes,
        "_grids": grids,
    }


def image_scores(result: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    return {
        "psnr": psnr(result, clean),
        "ssim": ssim(result, clean),
        "psnr_y": psnr(result, clean, y_channel=True),
        "ssim_y": ssim(result, clean, y_channel=True),
    }


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _grid_crop(pixels: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(center_crop(pixels, GRID_CROP))


def best_methods(row: dict, key: str, exclude: Sequence[str] = ()) -> set[str]:
    """Names of the methods with the highest ``key`` in a result row (ties all count)."""
    values = {m: r[key] for m, r in row["results"].items() if m not in exclude and r.get(key) is not None}
    if not values:
        return set()
    top = max(values.values())
    return {m for m, v in values.items() if v == top or (math.isinf(top) and math.isinf(v))}


def quality_markdown(results: dict) -> str:
    """The table as Markdown: PSNR (dB) / SSIM on RGB, best of each row in bold."""
    names = [m["name"] for m in results["methods"]]
    lines = [
        f"Mean PSNR (dB) / SSIM on 8-bit RGB over {len(results['images'])} image(s); best in bold.",
        "",
        "| noise | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for row in results["rows"]:
        best_p, best_s = best_methods(row, "psnr"), best_methods(row, "ssim")
        cells = []
        for name in names:
            r = row["results"][name]
            p, s = _fmt(r["psnr"], 2), _fmt(r["ssim"], 4)
            cells.append(f"{'**' + p + '**' if name in best_p else p} / {'**' + s + '**' if name in best_s else s}")
        lines.append(f"| {row['noise']} | " + " | ".join(cells) + " |")
    lines += ["", "Y-channel PSNR (dB):", "", "| noise | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in results["rows"]:
        lines.append(f"| {row['noise']} | " + " | ".join(_fmt(row["results"][n]["psnr_y"], 2) for n in names) + " |")
    if results["notes"]:
        lines += [""] + [f"- {note}" for note in results["notes"]]
    c = results["config"]
    lines += ["", f"Seed {c['seed']}, crop {c['crop']}, sigma for nlm/bm3d: "
              f"{'true sigma of Gaussian noise, else estimated' if c['oracle_sigma'] else 'estimated from each image'}."]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in text).strip("_")


def make_grid(panels: Sequence[tuple[str, np.ndarray]]) -> "PIL.Image.Image":  # noqa: F821
    """Panels side by side, each with its label (one or two lines) above it, in PIL's default font."""
    from PIL import Image, ImageDraw

    label_h, gap = 26, 4
    h = max(p.shape[0] for _, p in panels)
    w = sum(p.shape[1] for _, p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (w, h + label_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for name, pixels in panels:
        canvas.paste(Image.fromarray(pixels, "RGB"), (x, label_h))
        with contextlib.suppress(Exception):  # labels are a nicety: a font problem must not lose the grid
            width = max(4, pixels.shape[1] // 6)
            lines = [line[:width] for line in name.split("\n")[:2]]
            draw.text((x + 2, 1), "\n".join(lines), fill=(0, 0, 0), spacing=1)
        x += pixels.shape[1] + gap
    return canvas


def write_quality_outputs(results: dict, out_dir: str | os.PathLike) -> dict:
    """Write results.json, results.md and grid_<noise>.png into ``out_dir``; returns the JSON dict."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grids = results.pop("_grids", {})
    names = [m["name"] for m in results["methods"]]
    files = []
    for label, grid in grids.items():
        if grid is None:
            continue
        scores = grid.get("psnr", {})
        noisy_label = "noisy input" + (f"\n{_fmt(scores['noisy'], 2)} dB" if "noisy" in scores else "")
        panels = [(noisy_label, grid["noisy"])]
        panels += [(f"{n}\n{_fmt(scores.get(n), 2)} dB", grid["methods"][n]) for n in names if n != "noisy"]
        panels.append((f"clean\n{results['images'][0]}", grid["clean"]))
        path = out / f"grid_{_slug(label)}.png"
        make_grid(panels).save(path)
        files.append(path.name)
    results["grids"] = files
    (out / "results.json").write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    (out / "results.md").write_text(quality_markdown(results))
    return results


# --- speed ---------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"256,512x384"`` -> [(256, 256), (512, 384)] (height x width)."""
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            h, _, w = part.partition("x")
            size = (int(h), int(w or h))
        except ValueError:
            raise ValueError(f"bad size {part!r}: use N or HxW, e.g. 256 or 512x384") from None
        if min(size) < 8:
            raise ValueError(f"bad size {part!r}: at least 8 pixels per side")
        sizes.append(size)
    if not sizes:
        raise ValueError("no sizes given")
    return sizes


def parse_ints(text: str, what: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"bad {what} list {text!r}: use integers separated by commas") from None
    if not values or min(values) < minimum:
        raise ValueError(f"bad {what} list {text!r}: integers >= {minimum}")
    return values


def parse_words(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def peak_rss_mb() -> float:
    """This process's peak resident set size (getrusage ru_maxrss) in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024**2 if sys.platform == "darwin" else rss / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ``clear_refs`` 5); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], object], device, runs: int, warmup: int) -> list[float]:
    """Wall times of ``runs`` calls after ``warmup`` untimed ones (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
        _sync(device)
    times = []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def sgemm_gflops(device, n: int = 2048, runs: int = 5) -> dict:
    """Median rate of an n x n float32 matmul on ``device``: the practical FLOP ceiling."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    times = time_runs(lambda: torch.mm(a, b), device, runs, warmup=1)
    median = statistics.median(times)
    return {"device": str(device), "n": n, "runs": runs, "median_s": median, "gflops": 2 * n**3 / median / 1e9}


def _numpy_keep_mask_factory(state: np.random.RandomState, calls: list[int]):
    def draw(shape, ratio_range, generator, device):
        """The authors' way: a ratio from ``random.randint``, then ``np.random.choice`` on the host, per layer."""
        import torch

        low, high = ratio_range
        if high == 0:
            return None
        calls[0] += 1
        ratio = state.randint(low, high + 1) / 100
        mask = state.choice([0, 1], size=shape[:-1], p=[ratio, 1 - ratio])
        return torch.from_numpy(mask).to(device).unsqueeze(-1).to(torch.float32)

    return draw


@contextlib.contextmanager
def host_numpy_masks(seed: int = 0) -> Iterator[list[int]]:
    """Inside: the network draws its attention keep-masks with NumPy on the host and runs
    attention over all windows at once (no chunking), as the authors' code does.

    Patches ``mitdenoise.model.draw_keep_mask`` and ``CPU_ATTENTION_CHUNK`` for the
    duration (model.py itself is untouched); yields a one-item list counting the draws.
    """
    from . import model as model_module

    calls = [0]
    saved = (model_module.draw_keep_mask, getattr(model_module, "CPU_ATTENTION_CHUNK", None))
    model_module.draw_keep_mask = _numpy_keep_mask_factory(np.random.RandomState(seed), calls)
    if hasattr(model_module, "CPU_ATTENTION_CHUNK"):
        model_module.CPU_ATTENTION_CHUNK = None
    try:
        yield calls
    finally:
        model_module.draw_keep_mask = saved[0]
        if hasattr(model_module, "CPU_ATTENTION_CHUNK"):
            model_module.CPU_ATTENTION_CHUNK = saved[1]


class HostMaskReference:
    """The straightforward way to run the network: the whole image in one fp32 forward pass,
    attention masks drawn with NumPy on the host per layer (see :func:`host_numpy_masks`),
    image rolled and partitioned, plain attention over all 64 tokens of every window.

    Shares the weights of ``model``; the comparison point for the tiled denoiser's speed.
    """

    def __init__(self, model, device, seed: int = 0) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.seed = seed

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(to_unit(pixels).astype(np.float32).transpose(2, 0, 1).copy())[None].to(self.device)
        with host_numpy_masks(self.seed) as calls, torch.inference_mode():
            y = self.model(x, shortcut=False)
        if self.model.config.mask_enabled and calls[0] == 0:
            raise RuntimeError(
                "the network no longer draws its mask through model.draw_keep_mask: update bench.host_numpy_masks"
            )
        return from_unit(y.clamp(0, 1)[0].permute(1, 2, 0).float().cpu().numpy(), pixels.dtype)


REFERENCE_DESCRIPTION = (
    "whole image, one fp32 forward, NumPy host mask per layer, plain attention, no window chunking, "
    "in a fresh process with glibc's default malloc settings"
)


def measure_reference(
    model_path, device, size: tuple[int, int], seed: int, runs: int, warmup: int, threads: int
) -> dict | None:
    """Time :class:`HostMaskReference` in a child process; None if it dies (e.g. out of memory).

    A child, because the reference must see the allocator as the authors' script does
    (the tiled path changes it process-wide, see ``keep_freed_buffers_for_reuse``), and
    so that its peak RSS is its own.
    """
    args = json.dumps(dict(model=str(model_path), device=str(device), size=list(size), seed=seed, runs=runs,
                           warmup=warmup, threads=threads, parent=os.getpid()))
    code = "import sys; from mitdenoise.bench import _reference_child; _reference_child(sys.argv[1])"
    run = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True)
    if run.returncode != 0 or not run.stdout.strip():
        return None
    return json.loads(run.stdout.strip().splitlines()[-1])


def die_with_parent(parent: int) -> None:
    """Linux: have the kernel kill this process when ``parent`` ends, however it ends.

    A bench stopped with SIGTERM or SIGKILL would otherwise leave its reference child
    running on for minutes, with gigabytes of memory (seen here: 5.6 GB for 1024x1024).
    """
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent ended before the call above
        os._exit(1)


def _reference_child(args_json: str) -> None:
    import torch

    from .weights import load_model

    args = json.loads(args_json)
    die_with_parent(args["parent"])
    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    image = synthetic_image(*args["size"], args["seed"])
    ref = HostMaskReference(load_model(args["model"]), device, args["seed"])
    print(json.dumps(_measure(lambda: ref(image), device, args["runs"], args["warmup"])))


def run_speed(
    model: str | os.PathLike | None = None,
    *,
    sizes: Sequence[tuple[int, int]] = ((256, 256),),
    tiles: Sequence[int] = (128, 256),
    batch_sizes: Sequence[int] = (1,),
    precisions: Sequence[str] = ("fp32",),
    devices: Sequence[str] = ("auto",),
    threads: int | None = None,
    runs: int = 3,
    warmup: int = 1,
    tile_overlap: int = 32,
    reference: bool = True,
    sgemm_n: int = 2048,
    seed: int = 0,
    on_progress: Progress | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict:
    """Time the tiled denoiser for every combination, and the reference, on synthetic images.

    Per row: median seconds of ``runs`` after ``warmup``, MP/s, effective GFLOP/s
    (``2 * macs_per_pixel * MP/s``, image pixels only), its fraction of the sgemm
    rate, peak RSS (reset before each row where Linux allows it) and on CUDA the peak
    allocated memory; tiled rows also get the speed-up over the reference of the same
    device and size. Combinations that can't run here (no CUDA, no bf16) become notes.
    """
    import torch

    from .denoiser import Denoiser, pick_device
    from .errors import MitdenoiseError
    from .weights import load_model, resolve_model

    if threads is not None:
        torch.set_num_threads(threads)
    notes: list[str] = []
    model_path = resolve_model(model)
    net = load_model(model_path)
    config = net.config
    macs = macs_per_pixel(config)
    resolved = []
    for name in devices:
        try:
            resolved.append(pick_device(name))
        except MitdenoiseError as e:
            notes.append(f"device {name} skipped: {e}")
    resolved = list(dict.fromkeys(resolved))
    combos = [(p, t, b) for p in precisions for t in tiles for b in batch_sizes]
    if on_total:
        on_total(len(resolved) * (1 + len(sizes) * (len(combos) + (1 if reference else 0))))

    ceilings = {}
    rows = []
    for device in resolved:
        ceilings[str(device)] = sgemm_gflops(device, sgemm_n)
        if on_progress:
            on_progress(f"sgemm {sgemm_n} on {device}")
        for h, w in sizes:
            image = synthetic_image(h, w, seed)
            size_rows = []
            for precision, tile, batch in combos:
                try:
                    den = Denoiser(net, device=str(device), precision=precision, tile=tile, tile_overlap=tile_overlap,
                                   batch_size=batch, seed=seed)
                except (MitdenoiseError, ValueError) as e:
                    notes.append(f"{device} {precision} tile {tile} batch {batch} skipped: {e}")
                    if on_progress:
                        on_progress(f"skipped {precision} tile {tile}")
                    continue
                row = _measure(lambda: den.denoise_array(image), device, runs, warmup)
                row.update(kind="tiled", device=str(device), precision=precision, height=h, width=w, tile=tile,
                           tile_overlap=tile_overlap, batch_size=batch, tiles=den.count_tiles(h, w))
                size_rows.append(row)
                if on_progress:
                    on_progress(f"{h}x{w} tile {tile} batch {batch} {precision} on {device}")
            if reference:
                row = measure_reference(model_path, device, (h, w), seed, runs, warmup, torch.get_num_threads())
                if row is None:
                    notes.append(f"reference at {h}x{w} on {device} did not finish (out of memory?)")
                    rows += size_rows
                    continue
                row.update(kind="reference", device=str(device), precision="fp32", height=h, width=w, tile=None,
                           tile_overlap=None, batch_size=1, tiles=1)
                for other in size_rows:
                    other["speedup_vs_reference"] = row["median_s"] / other["median_s"]
                row["speedup_vs_reference"] = 1.0
                size_rows.append(row)
                if on_progress:
                    on_progress(f"{h}x{w} reference on {device}")
            rows += size_rows

    for row in rows:
        mp = row["height"] * row["width"] / 1e6
        row["megapixels"] = mp
        row["mp_per_s"] = mp / row["median_s"]
        row["s_per_mp"] = row["median_s"] / mp
        row["gflops_effective"] = 2 * macs * row["mp_per_s"] * 1e6 / 1e9
        ceiling = ceilings[row["device"]]["gflops"]
        row["fraction_of_sgemm"] = row["gflops_effective"] / ceiling if ceiling else None
    return {
        "schema": "mitdenoise.bench.speed/1",
        "config": {
            "model": None if model is None else str(model), "model_config": json_config(config),
            "macs_per_pixel": macs, "tflop_per_megapixel": 2 * macs * 1e6 / 1e12,
            "runs": runs, "warmup": warmup, "threads": torch.get_num_threads(), "seed": seed,
            "torch": torch.__version__, "peak_rss_per_row": all(r["peak_rss_is_per_row"] for r in rows),
            "reference": REFERENCE_DESCRIPTION,
        },
        "sgemm": ceilings,
        "rows": rows,
        "notes": notes,
    }


def json_config(config) -> dict:
    import dataclasses

    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _measure(fn: Callable[[], object], device, runs: int, warmup: int) -> dict:
    import torch

    gc.collect()
    per_row = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = time_runs(fn, device, runs, warmup)
    row = {
        "runs": runs,
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_is_per_row": per_row,
        "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 1024**2 if device.type == "cuda" else None,
    }
    return row


def _speedup(row: dict) -> str:
    return f"{row['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in row else "-"


def speed_markdown(results: dict) -> str:
    """The speed table as Markdown."""
    lines = [
        "| device | precision | size | tile | batch | median s | MP/s | s/MP | GFLOP/s | of sgemm "
        "| peak RSS MiB | CUDA MiB | vs reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['device']} | {r['precision']} | {r['height']}x{r['width']} | "
            f"{'whole (reference)' if r['kind'] == 'reference' else r['tile']} | {r['batch_size']} | "
            f"{r['median_s']:.3f} | {r['mp_per_s']:.4f} | {r['s_per_mp']:.1f} | {r['gflops_effective']:.1f} | "
            f"{100 * r['fraction_of_sgemm']:.1f}% | {r['peak_rss_mb']:.0f} | "
            f"{_fmt(r['cuda_peak_mb'], 0)} | "
            f"{_speedup(r)} |"
        )
    for dev, s in results["sgemm"].items():
        lines.append(f"\nsgemm {s['n']}x{s['n']} float32 on {dev}: {s['gflops']:.1f} GFLOP/s (median of {s['runs']}).")
    c = results["config"]
    lines.append(f"\nNetwork cost: {c['macs_per_pixel']:,} multiply-adds per pixel "
                 f"= {c['tflop_per_megapixel']:.2f} TFLOP per megapixel.")
    lines += [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def write_speed_outputs(results: dict, out_dir: str | os.PathLike) -> None:
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "speed.md").write_text(speed_markdown(results))


def default_clean_image() -> tuple[str, np.ndarray]:
    """The bundled Kodak crop of a source checkout, else a synthetic 256x256 image."""
    path = Path(__file__).resolve().parent.parent / "examples" / "kodim23-clean.png"
    if path.is_file():
        with contextlib.suppress(Exception):
            return path.name, read_rgb8(path)
    return "synthetic.png", synthetic_image(256, 256, 0)
