"""``mitdenoise bench [quality|speed|train]``: thin commands over :mod:`mitdenoise.bench`.

Results go to stdout (a table, or JSON with ``--json``), progress and notes to
stderr. They import the library (and torch) only when run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..defaults import DEFAULT_OVERLAP, DEFAULT_TILE
from ..errors import MitdenoiseError
from .console import counting_bars, fail, note, out, parse_range, set_threads

DEFAULT_OUT = Path("bench-results")


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an --out that can't take the result files before the benchmark runs, not after."""
    from ..imageio import blocked_folder

    if out_dir.exists() and not out_dir.is_dir():
        fail(f"--out {out_dir} is a file, not a folder")
    blocked = blocked_folder(out_dir)
    if blocked is not None:
        fail(f"--out {out_dir}: cannot write into {blocked}")


class _Bar:
    """A rich progress bar on stderr driven by the library's ``on_total`` / ``on_progress`` callbacks."""

    def __init__(self, quiet: bool, what: str) -> None:
        self.progress = counting_bars(quiet)
        self.task = self.progress.add_task(what, total=None)

    def total(self, n: int) -> None:
        self.progress.update(self.task, total=n)

    def step(self, description: str) -> None:
        self.progress.update(self.task, advance=1, description=escape(description[:60]))

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


# --- option types shared by the commands ----------------------------------------------------------

ModelsOpt = Annotated[
    Optional[list[str]],
    typer.Option("--model", "-m", help="Model spec (registry name, hf://..., or a .pth/.safetensors path); repeat for several. Default: the default model (offline: its fallback)."),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder for the result files.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the results as JSON instead of a table.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or notes.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
SeedOpt = Annotated[int, typer.Option(min=0, max=2**63 - 1, help="Seed of the synthetic noise and of the attention-mask draws.")]
ThreadsOpt = Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's choice).")]


# --- bench quality ------------------------------------------------------------------------------


def bench_quality_command(
    clean: Annotated[Path, typer.Argument(help="Folder of clean images.")],
    noisy: Annotated[
        Optional[Path], typer.Option("--noisy", help="Folder of given noisy images (same file names as CLEAN): adds a row.")
    ] = None,
    noise: Annotated[
        Optional[str],
        typer.Option("--noise", "-n", help="Synthetic noises as kind:level items, e.g. gaussian:15,poisson:2,speckle:0.024,saltpepper:0.002,correlated:15,mixture:15. Default: light Gaussian 5 and the paper's four, unless --noisy is given."),
    ] = None,
    model: ModelsOpt = None,
    passes: Annotated[int, typer.Option(help="Also run each model with this many averaged mask draws (column 'name xN').")] = 1,
    strength: Annotated[str, typer.Option(help="Comma list of strengths to run each model at, e.g. 1,0.8 (column 'name s0.8').")] = "1",
    published: Annotated[
        Optional[list[str]], typer.Option("--published", help="NAME=FOLDER: another method's published outputs for the --noisy images (a column).")
    ] = None,
    baselines: Annotated[str, typer.Option(help="Comma list of noisy, nlm, bm3d (or none).")] = "noisy,nlm,bm3d",
    oracle_sigma: Annotated[bool, typer.Option("--oracle-sigma", help="Give nlm/bm3d the true sigma of Gaussian noise instead of an estimate.")] = False,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N images.")] = None,
    crop: Annotated[Optional[int], typer.Option(help="Center-crop every image to S x S pixels (for speed).")] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    precision: Annotated[str, typer.Option(help="auto (as denoise: bf16 on CUDA, else fp32), fp32, bf16 or fp16.")] = "auto",
    tile: Annotated[int, typer.Option(help="Tile size of the model runs (denoise's default).")] = DEFAULT_TILE,
    tile_overlap: Annotated[int, typer.Option(help="Tile overlap of the model runs.")] = DEFAULT_OVERLAP,
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 1,
    threads: ThreadsOpt = None,
    out_dir: OutOpt = DEFAULT_OUT,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """PSNR/SSIM of models and classical denoisers on synthetic (or given) noise.

    Writes results.json, results.md and grid_<noise>.png into --out.

    Example:  mitdenoise bench quality data/kodak24 --noise gaussian:15,poisson:2 --crop 256 --limit 4 -m mitdenoise-mild -m masked-denoising --passes 4
    """
    from ..bench import quality

    if limit is not None and limit < 1:
        fail("--limit must be >= 1", 2)
    if crop is not None and crop < 16:
        fail("--crop must be >= 16 (SSIM needs 11x11 windows)", 2)
    if passes < 1:
        fail("--passes must be >= 1", 2)
    _check_out_dir(out_dir)
    set_threads(threads)
    try:
        strengths = [float(v) for v in strength.replace(" ", "").split(",") if v]
    except ValueError:
        strengths = []
    if not strengths or not all(0 <= v <= 1 for v in strengths):
        fail(f"--strength takes numbers from 0 to 1 separated by commas, not {strength!r}", 2)
    try:
        names = quality.parse_baselines(baselines)
        published_dirs = quality.parse_published(published or [])
        grids: dict = {}
        with _Bar(quiet, "quality") as bar:
            results = quality.run_quality(
                clean, noisy_dir=noisy, noise_spec=noise, models=_models(model), passes=passes, baselines=names,
                strengths=strengths, published=published_dirs,
                seed=seed, limit=limit, crop=crop, oracle_sigma=oracle_sigma, device=device, precision=precision,
                tile=tile, tile_overlap=tile_overlap, batch_size=batch_size, grids=grids, on_progress=bar.step,
                on_total=bar.total,
            )
        results = quality.write_quality_outputs(results, out_dir, grids)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e), 2 if isinstance(e, ValueError) else 1)
    except MitdenoiseError as e:
        fail(str(e))
    _report_quality(results, out_dir, as_json, quiet)


def _print_notes_or_json(results: dict, as_json: bool, quiet: bool) -> bool:
    """Notes go to stderr; with --json the results go to stdout and the caller prints no table."""
    if not quiet:
        for text in results["notes"]:
            note(text)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    return as_json


def _report_quality(results: dict, out_dir: Path, as_json: bool, quiet: bool) -> None:
    from ..bench.quality import quality_tables

    if _print_notes_or_json(results, as_json, quiet):
        return
    table = quality_tables(results)[0]
    table.notes = []  # the notes went to stderr above; the seed line is in results.md
    _print_table(table, f"Y-channel PSNR and per-image values in {out_dir / 'results.json'}")


def _print_table(table, caption: str) -> None:
    """A :class:`~mitdenoise.bench.common.ResultTable` on stdout with rich: its ``**best**`` cells
    bold, its notes as lines under it."""
    rich_table = Table(title=escape(table.title), caption=escape(caption), caption_justify="left")
    for i, column in enumerate(table.columns):
        rich_table.add_column(escape(column), justify="left" if i < table.text_columns else "right")
    for row in table.rows:
        rich_table.add_row(*(_bold(cell) for cell in row))
    out.print(rich_table, highlight=False)
    for line in table.notes:
        out.print(line, markup=False, highlight=False, soft_wrap=True)


def _bold(cell: str) -> str:
    """Markdown's ``**x**`` as rich's ``[bold]x[/]``, the rest escaped."""
    parts = cell.split("**")
    return "".join(f"[bold]{escape(p)}[/]" if i % 2 else escape(p) for i, p in enumerate(parts))


def _models(specs: Optional[list[str]]) -> list[Optional[str]]:
    return list(specs) if specs else [None]


# --- bench speed --------------------------------------------------------------------------------


def bench_speed_command(
    model: Annotated[
        Optional[str], typer.Option("--model", "-m", help="Model spec. Default: the default model (offline: its fallback).")
    ] = None,
    sizes: Annotated[str, typer.Option(help="Image sizes, N or HxW, comma separated.")] = "256,512",
    tiles: Annotated[str, typer.Option(help="Tile sizes, comma separated.")] = "256,544",
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes, comma separated.")] = "1",
    precisions: Annotated[str, typer.Option(help="Precisions: fp32, bf16, fp16, comma separated.")] = "fp32",
    devices: Annotated[str, typer.Option(help="Devices, comma separated (auto, cpu, cuda, cuda:N).")] = "auto",
    threads: ThreadsOpt = None,
    runs: Annotated[int, typer.Option(help="Timed runs per row (the median is reported).")] = 3,
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 1,
    tile_overlap: Annotated[int, typer.Option(help="Tile overlap.")] = DEFAULT_OVERLAP,
    reference: Annotated[bool, typer.Option(help="Also time the whole-image, host-NumPy-mask reference.")] = True,
    sgemm_size: Annotated[int, typer.Option(min=1, help="Size of the sgemm that measures the FLOP ceiling.")] = 2048,
    seed: SeedOpt = 0,
    out_dir: OutOpt = DEFAULT_OUT,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Megapixels per second and peak memory, beside the straightforward reference and the sgemm ceiling.

    Writes speed.json and speed.md into --out.

    Example:  mitdenoise bench speed --sizes 256,512 --tiles 128,256 --batch-sizes 1,4 --precisions fp32,bf16 --threads 2
    """
    from ..bench import speed

    if runs < 1 or warmup < 0:
        fail("--runs must be >= 1 and --warmup >= 0", 2)
    _check_out_dir(out_dir)
    try:
        size_list = speed.parse_sizes(sizes)
        tile_list = speed.parse_ints(tiles, "tile", 8)
        batch_list = speed.parse_ints(batch_sizes, "batch size", 1)
        precision_list = speed.parse_words(precisions)
        device_list = speed.parse_words(devices)
        if threads is not None and threads < 1:
            raise ValueError("--threads must be >= 1")
        with _Bar(quiet, "speed") as bar:
            results = speed.run_speed(
                model, sizes=size_list, tiles=tile_list, batch_sizes=batch_list, precisions=precision_list,
                devices=device_list, threads=threads, runs=runs, warmup=warmup, tile_overlap=tile_overlap,
                reference=reference, sgemm_n=sgemm_size, seed=seed, on_progress=bar.step, on_total=bar.total,
            )
        speed.write_speed_outputs(results, out_dir)
    except ValueError as e:
        fail(str(e), 2)
    except MitdenoiseError as e:
        fail(str(e))
    _report_speed(results, out_dir, as_json, quiet)
    if not results["rows"]:
        fail("nothing was measured: every combination was skipped (see the notes above)")


def _report_speed(results: dict, out_dir: Path, as_json: bool, quiet: bool) -> None:
    from ..bench.speed import speed_table

    _report_timings(results, speed_table, out_dir / "speed.json", as_json, quiet)


def _report_timings(results: dict, make_table, saved: Path, as_json: bool, quiet: bool) -> None:
    """A timing benchmark's notes on stderr, then its table (or the JSON) on stdout."""
    if _print_notes_or_json(results, as_json, quiet):
        return
    table = make_table(results)
    table.notes = [n for n in table.notes if not n.startswith("- ")]  # the run's notes went to stderr above
    _print_table(table, f"Also in {saved}")


# --- bench train --------------------------------------------------------------------------------


def bench_train_command(
    model_config: Annotated[
        Optional[Path], typer.Option("--model-config", help="A training TOML (train --config) whose \\[model] table is the network. Default: the shipped checkpoints' network.")
    ] = None,
    batch: Annotated[int, typer.Option(help="Patches per step.")] = 8,
    patch_size: Annotated[int, typer.Option(help="Patch side in pixels.")] = 64,
    iterations: Annotated[int, typer.Option(help="Timed steps per route (the median is reported).")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed steps per route first.")] = 1,
    attn_mask: Annotated[str, typer.Option(help="Attention-mask ratio in percent, N or LOW,HIGH; 0 for off.")] = "75",
    input_mask: Annotated[str, typer.Option(help="Input-mask ratio in percent, N or LOW,HIGH; 0 for off.")] = "80,90",
    threads: ThreadsOpt = None,
    sgemm_size: Annotated[int, typer.Option(min=1, help="Size of the sgemm that measures the FLOP ceiling.")] = 2048,
    one_forward: Annotated[bool, typer.Option("--one-forward", help="Also time the training route with the whole batch in one forward on intra-op threads (no parts).")] = False,
    seed: SeedOpt = 0,
    out_dir: OutOpt = DEFAULT_OUT,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Training patches per second on the CPU: the plain route beside the training route, steps alternating.

    A step is train's: forward, L1 loss, backward, Adam, EMA. Writes train-speed.json and train-speed.md into --out.

    Example:  mitdenoise bench train --threads 2 --batch 8 --iterations 7
    """
    from ..bench import train_speed

    _check_out_dir(out_dir)
    try:
        if threads is not None and threads < 1:
            raise ValueError("--threads must be >= 1")
        attn = parse_range(attn_mask, "--attn-mask", percent=True)
        masked = parse_range(input_mask, "--input-mask", percent=True)
        with _Bar(quiet, "train speed") as bar:
            results = train_speed.run_train_speed(
                model_config, threads=threads, batch=batch, patch=patch_size, iterations=iterations, warmup=warmup,
                attn_mask=attn, input_mask=masked, sgemm_n=sgemm_size, one_forward=one_forward, seed=seed,
                on_progress=bar.step, on_total=bar.total,
            )
        train_speed.write_train_speed_outputs(results, out_dir)
    except ValueError as e:
        fail(str(e), 2)
    except MitdenoiseError as e:
        fail(str(e))
    _report_train_speed(results, out_dir, as_json, quiet)


def _report_train_speed(results: dict, out_dir: Path, as_json: bool, quiet: bool) -> None:
    from ..bench.train_speed import train_speed_table

    _report_timings(results, train_speed_table, out_dir / "train-speed.json", as_json, quiet)


# --- bench (default) ----------------------------------------------------------------------------


def bench_default_command(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model spec. Default: the default model (offline: its fallback).")] = None,
    threads: ThreadsOpt = None,
    out_dir: OutOpt = DEFAULT_OUT,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """A small run of both benchmarks on data it makes itself (a few minutes at most on 2 CPU cores).

    Quality: the bundled Kodak crop (or a synthetic image), 128x128, five noises, the
    model against noisy / nlm / bm3d. Speed: 256x256, tiles 128 and 256, fp32, median
    of 2 runs after a warm-up, against the reference. For more, see `bench quality --help` and `bench speed --help`.

    Example:  mitdenoise bench --out bench-results
    """
    if ctx.invoked_subcommand is not None:
        given = [name for name, value, default in (
            ("--model", model, None), ("--threads", threads, None), ("--out", out_dir, DEFAULT_OUT),
            ("--json", as_json, False), ("--quiet", quiet, False)) if value != default]
        if given:
            fail(f"{', '.join(given)} before '{ctx.invoked_subcommand}' would be ignored: "
                  f"put options after it (mitdenoise bench {ctx.invoked_subcommand} ... {given[0]} ...)", 2)
        return
    _check_out_dir(out_dir)
    from ..bench import quality as quality_bench
    from ..bench import speed as speed_bench

    set_threads(threads)
    try:
        name, image = quality_bench.default_clean_image()
        grids: dict = {}
        with _Bar(quiet, "quality") as bar:
            quality = quality_bench.run_quality(
                clean_images=[(name, image)], noise_spec=quality_bench.DEFAULT_NOISES + ",mixture:15", models=[model],
                crop=128, tile=128, grids=grids, on_progress=bar.step, on_total=bar.total,
            )
        quality = quality_bench.write_quality_outputs(quality, out_dir, grids)
        with _Bar(quiet, "speed") as bar:
            speed = speed_bench.run_speed(model, sizes=[(256, 256)], tiles=[128, 256], runs=2, warmup=1, threads=threads,
                                    on_progress=bar.step, on_total=bar.total)
        speed_bench.write_speed_outputs(speed, out_dir)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    except MitdenoiseError as e:
        fail(str(e))
    if as_json:
        if not quiet:
            for text in quality["notes"] + speed["notes"]:
                note(text)
        typer.echo(json.dumps({"quality": quality, "speed": speed}, indent=2))
        return
    _report_quality(quality, out_dir, False, quiet)
    _report_speed(speed, out_dir, False, quiet)


bench_app = typer.Typer(
    help="Benchmarks. Alone: a small default run of both (works offline).",
    invoke_without_command=True,
    no_args_is_help=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
bench_app.callback()(bench_default_command)
bench_app.command("quality")(bench_quality_command)
bench_app.command("speed")(bench_speed_command)
bench_app.command("train")(bench_train_command)


# --- noise --------------------------------------------------------------------------------------
