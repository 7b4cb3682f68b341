"""The quality benchmark: PSNR/SSIM per noise and method.

Clean images get synthetic noise (seeded per image and noise, so the numbers don't
depend on order), or given noisy/clean pairs are used as they are; every method
denoises the same noisy images; the mean PSNR and SSIM (RGB, 8-bit, like the paper;
Y of YCbCr too) go into ``results.json`` and ``results.md``, and one picture grid per
noise row into PNGs.

Methods: model checkpoints (through :class:`~mitdenoise.denoiser.Denoiser`), the same
with several averaged attention-mask draws, the noisy input itself, OpenCV non-local
means and BM3D (the optional ``bm3d`` package). The classical methods need the noise
level: it is estimated from each noisy image (:func:`mitdenoise.noise.estimate_sigma`)
unless ``oracle_sigma`` gives them the true sigma of Gaussian noise.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import noise as noises
from ..checkpoints import TRAIN_CHECKPOINT_NAME, TRAIN_EXPORT_NAME
from ..files import write_atomically
from ..imageio import center_crop, image_files, from_float, read_rgb8, to_float, to_rgb8
from ..metrics import psnr, ssim
from ..defaults import DEFAULT_OVERLAP
from .common import Progress, ResultTable, format_number, synthetic_image, write_results

BASELINES = ("noisy", "nlm", "bm3d")
DEFAULT_NOISES = "gaussian:5,gaussian:15,poisson:2,speckle:0.024,saltpepper:0.002"
"""The paper's four test noises, after light Gaussian noise: camera photos at low ISO are about that light."""
NLM_H_PER_SIGMA = 0.7
"""h = hColor = 0.7 sigma (8-bit units): best on average over sigma 10..50 (docs/benchmarks.md)."""
GRID_CROP = 128


def list_images(folder: Path) -> list[Path]:
    """The image files of a folder (the suffixes imageio reads), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    files = image_files(folder)
    if not files:
        raise FileNotFoundError(f"no images in {folder}")
    return files


def model_label(spec: str | os.PathLike | None) -> str:
    """A short column name for a model spec: the registry name, the file's stem, or for the files
    ``mitdenoise train`` writes (every run's are named alike) the run folder and the stem."""
    if spec is None:
        from ..registry import DEFAULT_MODEL

        return DEFAULT_MODEL
    text = str(spec)
    if "/" in text or os.sep in text or Path(text).suffix.lower() in (".pth", ".pt", ".safetensors"):
        path = Path(text.rstrip("/"))
        if path.name in _RUN_FILES and path.parent.name:
            return f"{path.parent.name}/{path.stem}"
        return path.stem
    return text


_RUN_FILES = (TRAIN_EXPORT_NAME, TRAIN_CHECKPOINT_NAME)


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
    outputs: dict[str, np.ndarray] | None = None
    """Published outputs by image name, for kind "published" (``run`` is not called)."""


def model_methods(
    specs: Sequence[str | None],
    passes: int = 1,
    taken: set[str] | None = None,
    strengths: Sequence[float] = (1.0,),
    notes: list[str] | None = None,
    **denoiser_options,
) -> list[Method]:
    """One column per model spec and strength (``"<name> s0.8"`` below 1), plus ``"<name> xN"`` with
    N averaged mask draws when passes > 1 (masked models only: a model without the attention mask
    gives the same output every draw). None is the default model, or its fallback where it can't
    be had (named so, with a note)."""
    from ..checkpoints import load_model
    from ..denoiser import Denoiser
    from ..registry import resolve

    taken = set() if taken is None else taken
    methods = []
    for spec in specs:
        resolved = resolve(spec)
        if resolved.notice and notes is not None:
            notes.append(resolved.notice)
        spec = spec if spec is not None else resolved.name
        net = None if resolved.path is None else load_model(resolved.path)
        name = _unique(model_label(spec), taken)
        for n in (1, passes) if passes > 1 and net is not None and net.config.mask_enabled else (1,):
            for strength in strengths:
                den = Denoiser(spec if net is None else net, passes=n, strength=strength, **denoiser_options)
                label = name if n == 1 else f"{name} x{n}"
                label = label if strength == 1 else f"{label} s{strength:g}"
                label = name if label == name else _unique(label, taken)
                info = {"model": str(spec), "passes": n, "strength": strength, "device": str(den.device),
                        "precision": den.precision, "tile": den.tile, "seed": den.seed}
                methods.append(Method(label, "model", lambda x, s, d=den: d.denoise_array(x), info=info))
    return methods


def published_methods(
    published: Sequence[tuple[str, Path]], cleans: Sequence[tuple[str, np.ndarray]], crop: int | None,
    taken: set[str],
) -> list[Method]:
    """A column per folder of another method's published outputs for the given noisy images (same
    file stems as the clean ones): its scores are those files', its time is not measured."""
    methods = []
    for label, folder in published:
        by_stem = {p.stem: p for p in list_images(Path(folder))}
        outputs = {}
        for name, clean in cleans:
            path = by_stem.get(Path(name).stem)
            if path is None:
                raise FileNotFoundError(f"no output for {name} in {folder} (published outputs of {label})")
            image = read_rgb8(path)
            if image.shape != clean.shape and crop:
                image = center_crop(image, crop)
            if image.shape != clean.shape:
                raise ValueError(f"{path}: {image.shape[:2]}, its clean image {clean.shape[:2]}")
            outputs[name] = np.ascontiguousarray(image)
        methods.append(Method(_unique(label, taken), "published", lambda x, s: None,
                              info={"folder": str(folder)}, outputs=outputs))
    return methods


def parse_published(items: Sequence[str]) -> list[tuple[str, Path]]:
    """``["mcwnnm=path/to/dir"]`` -> ``[("mcwnnm", Path(...))]``."""
    pairs = []
    for item in items:
        label, sep, folder = item.partition("=")
        if not sep or not label.strip() or not folder.strip():
            raise ValueError(f"--published takes NAME=FOLDER, not {item!r}")
        pairs.append((label.strip(), Path(folder.strip())))
    return pairs


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
    return from_float(np.asarray(out), np.uint8)


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


def noisy_version(clean: np.ndarray, kind: str, level: float, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, reference), uint8, of row (kind, level) for image ``index``: the same whatever the run order.

    The reference is ``clean`` itself except for camera noise, whose clean twin it is
    (``noise.noisy_pair``).
    """
    rng = noises.derived_rng(seed, index, kind, float(level))
    noisy, reference = noises.noisy_pair(to_float(clean, np.float64), kind, level, rng)
    return from_float(noisy, np.uint8), from_float(reference, np.uint8)


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
    strengths: Sequence[float] = (1.0,),
    published: Sequence[tuple[str, Path]] = (),
    baselines: Sequence[str] = BASELINES,
    seed: int = 0,
    limit: int | None = None,
    crop: int | None = None,
    oracle_sigma: bool = False,
    device: str = "auto",
    precision: str = "auto",
    tile: int = 256,
    tile_overlap: int = DEFAULT_OVERLAP,
    batch_size: int = 1,
    grids: dict | None = None,
    on_progress: Progress | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict:
    """Run every method on every (noise row, image); returns the results as a JSON-ready dict.

    Rows are the synthetic noises of ``noise_spec`` (on the clean images) plus, with
    ``noisy_dir``, a row ``given:<folder>`` of the given noisy images. Synthetic noise
    for image i and noise (kind, level) is seeded by (seed, i, kind, level). Images are
    evaluated as 8-bit RGB. ``grids``, a dict if given, receives each row's picture crops
    (first image: noisy, clean, every method's output) for :func:`write_quality_outputs`.
    """
    cleans, given = load_quality_data(
        Path(clean_dir) if clean_dir is not None else None,
        Path(noisy_dir) if noisy_dir is not None else None,
        clean_images, limit, crop,
    )
    rows = _noise_rows(noise_spec, noisy_dir, given)
    notes: list[str] = []
    taken: set[str] = set()
    methods = baseline_methods([b for b in baselines if b == "noisy"], notes, taken)
    methods += model_methods(list(models), passes, taken, strengths, notes, device=device, precision=precision,
                             tile=tile, tile_overlap=tile_overlap, batch_size=batch_size, seed=seed)
    methods += baseline_methods([b for b in baselines if b != "noisy"], notes, taken)
    if published:
        if given is None or len(rows) != 1:
            raise ValueError("published outputs belong to given noisy images: use them with --noisy and no --noise")
        methods += published_methods(published, cleans, crop, taken)
    if not methods:
        raise ValueError("no methods to run: give --model and/or baselines")
    if on_total:
        on_total(len(rows) * len(cleans) * len(methods))
    out_rows = []
    for row in rows:
        result, grid = _run_row(row, cleans, methods, seed, oracle_sigma, on_progress)
        out_rows.append(result)
        if grids is not None:
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
    }


def _noise_rows(noise_spec, noisy_dir, given) -> list[NoiseRow]:
    """The rows to run: the synthetic noises asked for (the default set when neither noise nor
    noisy images are given), then the given noisy images as a row of their own."""
    if isinstance(noise_spec, str):
        noise_list = noises.parse_noise_spec(noise_spec)
    elif noise_spec is None:
        noise_list = noises.parse_noise_spec(DEFAULT_NOISES) if noisy_dir is None else []
    else:
        noise_list = noises.parse_noise_spec(",".join(noises.noise_label(k, float(v)) for k, v in noise_spec))
    rows = [NoiseRow(noises.noise_label(k, v), k, v) for k, v in noise_list]
    if given is not None:
        rows.append(NoiseRow(f"given:{Path(noisy_dir).name}", "given", None, given))
    if not rows:
        raise ValueError("nothing to evaluate: give noise kinds (e.g. gaussian:15) or a folder of noisy images")
    return rows


def _run_row(row: NoiseRow, cleans, methods, seed: int, oracle_sigma: bool, on_progress) -> tuple[dict, dict]:
    """Every method on every image of one noise row: the row's results, and its grid crops."""
    per_image: dict[str, list[dict]] = {m.name: [] for m in methods}
    seconds = dict.fromkeys(per_image, 0.0)
    sigmas = []
    oracle = oracle_sigma and row.kind in ("gaussian", "correlated")
    grid: dict = {}
    for index, (name, clean) in enumerate(cleans):
        if row.given is not None:
            noisy = row.given[index]
        else:
            noisy, clean = noisy_version(clean, row.kind, row.level, seed, index)
        sigma = float(row.level) if oracle else noises.estimate_sigma(noisy / 255.0) * 255.0
        sigmas.append(sigma)
        if index == 0:
            grid = {"noisy": _grid_crop(noisy), "clean": _grid_crop(clean), "methods": {}, "psnr": {}}
        for method in methods:
            start = time.perf_counter()
            result = method.outputs[name] if method.kind == "published" else method.run(noisy, sigma)
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
    return {
        "noise": row.label,
        "kind": row.kind,
        "level": row.level,
        "sigma": {"source": "oracle" if oracle else "estimated", "mean_255": _mean(sigmas)},
        "results": results,
        "per_image": per_image,
    }, grid


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


def score_cells(row: dict, names: Sequence[str], bold: Callable[[str], str]) -> list[str]:
    """``"PSNR / SSIM"`` per method of a table row, the row's best of each marked by ``bold``."""
    best_p, best_s = best_methods(row, "psnr"), best_methods(row, "ssim")
    cells = []
    for name in names:
        r = row["results"][name]
        p, s = format_number(r["psnr"], 2), format_number(r["ssim"], 4)
        cells.append(f"{bold(p) if name in best_p else p} / {bold(s) if name in best_s else s}")
    return cells


def quality_tables(results: dict) -> list[ResultTable]:
    """PSNR (dB) / SSIM on RGB, best of each row in bold, then Y-channel PSNR: for the result file;
    the terminal shows the first."""
    names = [m["name"] for m in results["methods"]]
    c = results["config"]
    main = ResultTable(f"Mean PSNR (dB) / SSIM on 8-bit RGB over {len(results['images'])} image(s); best in bold.",
                       ["noise", "sigma", *names])
    for row in results["rows"]:
        main.rows.append([row["noise"], format_number(row["sigma"]["mean_255"], 1),
                          *score_cells(row, names, lambda text: f"**{text}**")])
    main.notes += [f"- {note}" for note in results["notes"]]
    main.notes.append(f"Seed {c['seed']}, crop {c['crop']}; sigma (8-bit levels, mean of the row), also given to "
                      f"nlm/bm3d: {'true sigma of Gaussian noise, else estimated' if c['oracle_sigma'] else 'estimated from each image'}.")
    luma = ResultTable("Y-channel PSNR (dB):", ["noise", *names])
    for row in results["rows"]:
        luma.rows.append([row["noise"], *(format_number(row["results"][n]["psnr_y"], 2) for n in names)])
    return [main, luma]


def quality_markdown(results: dict) -> str:
    """:func:`quality_tables` as Markdown."""
    return "\n".join(table.markdown() for table in quality_tables(results))


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


def write_quality_outputs(results: dict, out_dir: str | os.PathLike, grids: dict | None = None) -> dict:
    """Write results.json, results.md and grid_<noise>.png (from ``grids``, filled by
    :func:`run_quality`) into ``out_dir``; returns the JSON dict, with the grids' file names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grids = grids or {}
    names = [m["name"] for m in results["methods"]]
    files = []
    for label, grid in grids.items():
        if not grid:
            continue
        scores = grid.get("psnr", {})
        noisy_label = "noisy input" + (f"\n{format_number(scores['noisy'], 2)} dB" if "noisy" in scores else "")
        panels = [(noisy_label, grid["noisy"])]
        panels += [(f"{n}\n{format_number(scores.get(n), 2)} dB", grid["methods"][n]) for n in names if n != "noisy"]
        panels.append((f"clean\n{results['images'][0]}", grid["clean"]))
        path = out / f"grid_{_slug(label)}.png"
        grid_image = make_grid(panels)
        write_atomically(path, lambda temp, image=grid_image: image.save(temp, format="PNG"))
        files.append(path.name)
    results["grids"] = files
    write_results(results, out, "results", quality_markdown(results))
    return results


def default_clean_image() -> tuple[str, np.ndarray]:
    """The bundled Kodak crop of a source checkout, else a synthetic 256x256 image."""
    path = Path(__file__).resolve().parents[2] / "examples" / "kodim23-clean.png"
    if path.is_file():
        with contextlib.suppress(Exception):
            return path.name, read_rgb8(path)
    return "synthetic.png", synthetic_image(256, 256, 0)

