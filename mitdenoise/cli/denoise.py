"""``mitdenoise denoise``: files, folders or globs in, a file or a folder out."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..defaults import DEFAULT_MODEL, DEFAULT_OVERLAP, DEFAULT_TILE, FALLBACK_MODEL
from ..errors import MitdenoiseError
from ..stopping import StopFlag, signal_exit_code
from .console import DownloadBar, counting_bars, err, error, fail, note, notice, set_threads, show_library_log, warn

EPILOG = (
    "Examples:\n\n"
    "  mitdenoise denoise noisy.png clean.png\n\n"
    "  mitdenoise denoise photos/ denoised/ --suffix _dn\n\n"
    "  mitdenoise denoise 'scans/*.tif' out/ --model masked-denoising --passes 4\n\n"
    f"The default model is {DEFAULT_MODEL}, the authors' masked-training checkpoint (downloaded once, "
    f"then cached). Offline, or where it can't be had, {FALLBACK_MODEL} (shipped) runs instead and a "
    "notice says so; `mitdenoise models` lists the others."
)


def denoise_command(
    paths: Annotated[
        list[str], typer.Argument(help="Inputs (files, folders, globs) followed by the output file or folder.")
    ],
    model: Annotated[
        Optional[str],
        typer.Option("--model", "-m", help="Checkpoint: a registry name, hf://owner/repo/file, or a .pth/.safetensors path. Default: the default, else the fallback (marked in `mitdenoise models`)."),
    ] = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="Never connect: the cache or the shipped fallback (as HF_HUB_OFFLINE=1).")
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    tile: Annotated[int, typer.Option(help="Tile size in pixels (memory grows with its square).")] = DEFAULT_TILE,
    tile_overlap: Annotated[int, typer.Option(help="Overlap between tiles in pixels.")] = DEFAULT_OVERLAP,
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 1,
    precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA where supported, else fp32), fp32, bf16 (CUDA, or a CPU with native bf16), or fp16 on CUDA (fp16 tiles that overflow are redone in fp32).")] = "auto",
    seed: Annotated[int, typer.Option(min=0, max=2**63 - 1, help="Seed of the attention-mask draws (same seed, same output).")] = 0,
    passes: Annotated[int, typer.Option(help="Average this many independent attention-mask draws.")] = 1,
    attn_mask_ratio: Annotated[
        Optional[int], typer.Option(help="Attention-mask ratio in percent for checkpoints that don't carry it; 0 = off.")
    ] = None,
    strength: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="How much of the model's change to keep: 0 = the input unchanged, 1 = full effect.")
    ] = 1.0,
    suffix: Annotated[str, typer.Option(help="Added to output file names in folder runs.")] = "",
    format: Annotated[Optional[str], typer.Option("--format", help="Output format for folder runs (png, tif, ...); default: the input's.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs (default: skip them).")] = False,
    max_pixels: Annotated[
        Optional[int], typer.Option(min=1, help="Refuse images with more pixels than this (default: Pillow's bomb limit, 89 MP).")
    ] = None,
    threads: Annotated[
        Optional[int], typer.Option(help="CPU threads (default: every core; 1 when several processes share the cores).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, only errors.")] = False,
) -> None:
    """Denoise images: files, folders or globs in, a file or a folder out."""
    from ..batch import plan_jobs
    from ..denoiser import Denoiser
    from ..imageio import set_max_pixels
    from ..registry import validation_warning

    if len(paths) < 2:
        fail("give at least one input and an output, e.g. mitdenoise denoise in.png out.png", 2)
    set_threads(threads)
    if max_pixels is not None:
        set_max_pixels(max_pixels)
    try:
        jobs = plan_jobs(paths[:-1], paths[-1], suffix=suffix, fmt=format)
        show_library_log(quiet)
        with DownloadBar(quiet) as bar:
            denoiser = Denoiser(
                model, offline=offline, device=device, precision=precision, tile=tile, tile_overlap=tile_overlap,
                batch_size=batch_size, passes=passes, seed=seed, attn_mask_ratio=attn_mask_ratio,
                strength=strength, on_download=bar,
            )
    except MitdenoiseError as e:
        fail(str(e))
    except ValueError as e:
        fail(str(e), 2)
    if denoiser.notice and not quiet:
        notice(denoiser.notice)
    warning = validation_warning(denoiser.validation)
    if warning and not quiet:
        warn(warning)
    if passes > denoiser.passes and not quiet:
        note(f"--passes {passes} runs one pass: this model has no attention mask, so every draw is the same")

    stop = StopFlag(on_first=lambda: err.print("[yellow]stopping after the current image (signal again to abort it)[/]"))
    stop.install()
    summary = _run_with_progress(jobs, denoiser, overwrite, quiet, stop)
    for _, reason in summary.failed:
        error(reason)
    if not quiet:
        _print_summary(summary, denoiser)
    if stop.signal is not None:
        raise typer.Exit(signal_exit_code(stop.signal))
    if summary.failed:
        raise typer.Exit(1)


def _run_with_progress(jobs, denoiser, overwrite: bool, quiet: bool, stop: StopFlag):
    """Run the jobs with a files bar and a tiles bar on stderr, until ``stop`` is set."""
    from ..batch import run_jobs

    progress = counting_bars(quiet)
    files_task = progress.add_task("files", total=len(jobs))
    tiles_task = progress.add_task("tiles", total=1)

    def on_start(job, pixels):
        progress.update(tiles_task, description=escape(job.source.name), completed=0, total=None)

    def on_end(job, status):
        progress.advance(files_task)

    def run_one(job, image):
        h, w = image.pixels.shape[:2]
        progress.update(tiles_task, completed=0, total=denoiser.count_tiles(h, w))
        return denoiser.denoise_image(image, on_tiles=lambda n: progress.advance(tiles_task, n))

    with progress:
        return run_jobs(jobs, run_one, overwrite=overwrite, on_start=on_start, on_end=on_end, should_stop=lambda: bool(stop))


def _print_summary(summary, denoiser) -> None:
    rate = summary.seconds / summary.megapixels if summary.megapixels else 0.0
    parts = [f"denoised {len(summary.done)} file(s) with {escape(str(denoiser.model_name))}, "
             f"{summary.megapixels:.2f} MP in {summary.seconds:.1f} s"]
    if summary.megapixels:
        parts.append(f"{rate:.1f} s/MP on {denoiser.device}")
    if len(summary.done) == 1 and denoiser.last_plan is not None:
        parts.append(f"read {escape(denoiser.last_plan.describe())}")
    if summary.skipped:
        parts.append(f"{len(summary.skipped)} skipped (exist; --overwrite replaces)")
    if summary.failed:
        parts.append(f"{len(summary.failed)} failed")
    err.print("; ".join(parts), highlight=False, soft_wrap=True)
