"""``mitdenoise noise``: add synthetic noise to images (for benchmarks of your own)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import MitdenoiseError
from .console import err, error, fail

def noise_command(
    source: Annotated[str, typer.Argument(metavar="IN", help="Clean image file or folder.")],
    target: Annotated[str, typer.Argument(metavar="OUT", help="Output file (for one input) or folder.")],
    kind: Annotated[str, typer.Option("--kind", "-k", help="gaussian, correlated, poisson, speckle, saltpepper, mixture, camera, poissongaussian or gaussianjpeg.")] = "gaussian",
    level: Annotated[float, typer.Option("--level", "-l", help="gaussian/correlated/mixture/gaussianjpeg: sigma on 0..255; poisson: scale; speckle: variance; saltpepper: density; camera: raw noise std on 0..255 at mid-grey (1 light, 4 a phone indoors, 10+ heavy); poissongaussian: std at mid-grey.")] = 15.0,
    twin_suffix: Annotated[str | None, typer.Option("--twin-suffix", help="Also write the clean image to score against beside each output, its name + this suffix: for camera noise the clean twin (the same camera without the noise), else the input.")] = None,
    seed: Annotated[int, typer.Option(min=0, max=2**63 - 1, help="Seed. One file: numpy default_rng(seed); a folder: a stream per file name.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs (default: skip them).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or notes.")] = False,
) -> None:
    """Add synthetic noise to images; the output keeps bit depth, alpha and colour profile.

    Example:  mitdenoise noise examples/kodim23-clean.png noisy.png --kind poisson --level 2 --seed 0
              mitdenoise noise clean/ noisy/ --kind camera --level 4 --twin-suffix _clean
    """
    import dataclasses

    import numpy as np

    from .. import noise as noises
    from ..batch import plan_jobs, run_jobs
    from ..imageio import from_float, to_float, write_image
    from ..stopping import StopFlag, signal_exit_code

    try:
        kind = noises.canonical_kind(kind)
        level = noises.check_level(kind, level)
        jobs = plan_jobs([source], target)
    except ValueError as e:
        fail(str(e), 2)
    except MitdenoiseError as e:
        fail(str(e))

    def add_noise(job, image):
        rng = np.random.default_rng(seed) if len(jobs) == 1 else noises.derived_rng(seed, job.source.name)
        noisy, reference = noises.noisy_pair(to_float(image.pixels, np.float64), kind, level, rng)
        if twin_suffix:
            twin = job.target.with_name(job.target.stem + twin_suffix + job.target.suffix)
            write_image(twin, dataclasses.replace(image, pixels=from_float(reference, image.pixels.dtype)), overwrite=True)
        return dataclasses.replace(image, pixels=from_float(noisy, image.pixels.dtype))

    stop = StopFlag()
    stop.install()
    try:
        summary = run_jobs(jobs, add_noise, overwrite=overwrite, should_stop=lambda: bool(stop))
    finally:
        stop.restore()
    for _, reason in summary.failed:
        error(reason)
    if not quiet:
        parts = [f"{kind}:{level:g} noise: wrote {len(summary.done)} file(s)"]
        if summary.skipped:
            parts.append(f"{len(summary.skipped)} skipped (exist; --overwrite replaces)")
        if summary.failed:
            parts.append(f"{len(summary.failed)} failed")
        err.print("; ".join(parts), highlight=False)
    if stop.signal is not None:
        raise typer.Exit(signal_exit_code(stop.signal))
    if summary.failed:
        raise typer.Exit(1)
