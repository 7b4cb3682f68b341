"""Command line: a thin layer over the library. Progress on stderr, results on stdout."""

from __future__ import annotations

import os
import signal
import sys
import warnings
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__
from .errors import Aborted, MitdenoiseError
from .stopping import StopFlag

err = Console(stderr=True)
out = Console()

app = typer.Typer(
    help=(
        "Denoise images whose noise you don't know, with the masked-training SwinIR of Chen et al. (CVPR 2023).\n\n"
        "Example:  mitdenoise denoise photo.png photo-clean.png"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def set_threads(threads: Optional[int]) -> None:
    """``--threads`` of denoise and bench: torch's CPU thread count, unless None."""
    if threads is None:
        return
    if threads < 1:
        fail("--threads must be >= 1", 2)
    import torch

    torch.set_num_threads(threads)


def _version(value: bool) -> None:
    if value:
        out.print(f"mitdenoise {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Denoise images whose noise you don't know."""


@app.command(
    epilog=(
        "Examples:\n\n"
        "  mitdenoise denoise noisy.png clean.png\n\n"
        "  mitdenoise denoise photos/ denoised/ --suffix _dn\n\n"
        "  mitdenoise denoise 'scans/*.tif' out/ --model masked-denoising --passes 4\n\n"
        "The default model is our own baseline checkpoint shipped in weights/ (works offline; trained "
        "without masks: our masked one, --model mitdenoise, is undertrained). "
        "--model masked-denoising uses the authors' released checkpoint (downloaded once)."
    )
)
def denoise(
    paths: Annotated[
        list[str], typer.Argument(help="Inputs (files, folders, globs) followed by the output file or folder.")
    ],
    model: Annotated[
        Optional[str],
        typer.Option("--model", "-m", help="Checkpoint: a registry name, hf://owner/repo/file, or a .pth/.safetensors path. Default: the shipped default (marked in `mitdenoise models`)."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    tile: Annotated[int, typer.Option(help="Tile size in pixels (memory grows with its square).")] = 544,
    tile_overlap: Annotated[int, typer.Option(help="Overlap between tiles in pixels.")] = 32,
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 1,
    precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA where supported, else fp32), fp32, or bf16/fp16 on CUDA (fp16 tiles that overflow are redone in fp32).")] = "auto",
    seed: Annotated[int, typer.Option(min=0, max=2**63 - 1, help="Seed of the attention-mask draws (same seed, same output).")] = 0,
    passes: Annotated[int, typer.Option(help="Average this many independent attention-mask draws.")] = 1,
    attn_mask_ratio: Annotated[
        Optional[int], typer.Option(help="Attention-mask ratio in percent for checkpoints that don't carry it; 0 = off.")
    ] = None,
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
    from .batch import plan_jobs, run_jobs
    from .denoiser import Denoiser
    from .imageio import set_max_pixels
    from .weights import validation_warning

    if len(paths) < 2:
        fail("give at least one input and an output, e.g. mitdenoise denoise in.png out.png", 2)
    set_threads(threads)
    if max_pixels is not None:
        set_max_pixels(max_pixels)
    try:
        jobs = plan_jobs(paths[:-1], paths[-1], suffix=suffix, fmt=format)
        denoiser = Denoiser(
            model,
            device=device,
            precision=precision,
            tile=tile,
            tile_overlap=tile_overlap,
            batch_size=batch_size,
            passes=passes,
            seed=seed,
            attn_mask_ratio=attn_mask_ratio,
        )
    except MitdenoiseError as e:
        fail(str(e))
    except ValueError as e:
        fail(str(e), 2)
    warning = validation_warning(denoiser.validation)
    if warning and not quiet:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if passes > denoiser.passes and not quiet:
        err.print(
            f"[yellow]note:[/] --passes {passes} runs one pass: this model has no attention mask, so every draw is the same",
            highlight=False,
            soft_wrap=True,
        )

    stop = StopFlag(on_first=lambda: err.print("[yellow]stopping after the current image (signal again to abort it)[/]"))
    stop.install()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=quiet,
        transient=True,
    )
    files_task = progress.add_task("files", total=len(jobs))
    tiles_task = progress.add_task("tiles", total=1)

    def on_start(job, pixels):
        progress.update(tiles_task, description=escape(job.source.name), completed=0, total=None)

    def on_end(job, status):
        progress.advance(files_task)

    def run_one(image):
        h, w = image.pixels.shape[:2]
        progress.update(tiles_task, completed=0, total=denoiser.count_tiles(h, w))
        return denoiser.denoise_image(image, on_tiles=lambda n: progress.advance(tiles_task, n))

    with progress:
        summary = run_jobs(jobs, run_one, overwrite=overwrite, on_start=on_start, on_end=on_end, should_stop=lambda: bool(stop))

    for job, reason in summary.failed:
        err.print(f"[bold red]error:[/] {escape(reason)}", highlight=False, soft_wrap=True)
    if not quiet:
        rate = summary.seconds / summary.megapixels if summary.megapixels else 0.0
        parts = [f"denoised {len(summary.done)} file(s), {summary.megapixels:.2f} MP in {summary.seconds:.1f} s"]
        if summary.megapixels:
            parts.append(f"{rate:.1f} s/MP on {denoiser.device}")
        if summary.skipped:
            parts.append(f"{len(summary.skipped)} skipped (exist; --overwrite replaces)")
        if summary.failed:
            parts.append(f"{len(summary.failed)} failed")
        err.print("; ".join(parts), highlight=False, soft_wrap=True)
    if stop.signal is not None:
        raise typer.Exit(128 + stop.signal)
    if summary.failed:
        raise typer.Exit(1)


def run(program: typer.Typer | None = None, **kwargs) -> None:
    """Entry point that turns any user-facing error into one line and a non-zero exit, and a
    second stop signal into 128 + its number (typer makes every KeyboardInterrupt 130).

    After an abort the process ends at once (``os._exit``, once the writers have removed
    their temp files on the way up): the chunk workers may still hold abandoned work, and
    waiting for them at interpreter exit could hang. Signals during that exit take their
    default action for the same reason.
    """
    warnings.showwarning = _show_warning
    try:
        (program or app)(**kwargs)
    except MitdenoiseError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except SystemExit as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, Aborted):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + cause.signum)
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning is one line on stderr, like our errors, not Python's file:line and source."""
    err.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def _register_commands() -> None:
    """Commands whose bodies live next to the library code they drive."""
    from .weights_cli import convert_command, download_command, models_command

    app.command("models", help="List the models --model accepts: name, source, size, cached or not, licence.")(
        models_command
    )
    app.command("download", help="Fetch a model into the cache (verified, converted to safetensors).")(
        download_command
    )
    app.command("convert", help="Convert an authors'-format .pth to our .safetensors (config in its metadata).")(
        convert_command
    )

    from .train.cli import EPILOG as TRAIN_EPILOG
    from .train.cli import train_command

    app.command("train", epilog=TRAIN_EPILOG, help="Train the masked-training denoiser on a folder of clean images.")(
        train_command
    )

    from .bench_cli import register

    register(app)  # bench, bench quality, bench speed, noise


_register_commands()
