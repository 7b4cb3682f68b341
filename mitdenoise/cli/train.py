"""``mitdenoise train``: a thin layer over :func:`mitdenoise.train.train`.

The main CLI registers ``train_command``; ``python -m mitdenoise.train`` (what torchrun
launches) runs it on its own through :func:`main`. Torch is imported only when the
command runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .console import err, fail, out, parse_range, run_app, show_library_log

EPILOG = (
    "Examples:\n\n"
    "  mitdenoise train --data photos/ --preset quick --val-clean val/\n\n"
    "  mitdenoise train --data photos/ --out runs/masked --config my.toml\n\n"
    "  mitdenoise train --out runs/masked --resume\n\n"
    "  mitdenoise train --data photos/ --baseline --out runs/baseline\n\n"
    "  mitdenoise train --data photos/ --init mitdenoise-baseline --out runs/finetune\n\n"
    "  torchrun --nproc_per_node 4 -m mitdenoise.train --data photos/ --out runs/ddp\n\n"
    "Presets: paper (the authors' recipe: full network, batch 64, 400k iterations), "
    "quick (tiny network, minutes on a CPU), cpu (full network, batch 8, fp32, for long CPU runs). "
    "Ctrl-C or SIGTERM writes a checkpoint and exits with 130/143; --resume continues exactly."
)

Opt = typer.Option


def train_command(
    data: Annotated[Optional[Path], Opt("--data", "-d", help="Folder of clean training images (searched recursively).")] = None,
    preset: Annotated[Optional[str], Opt("--preset", "-p", help="paper | quick | cpu  \\[default: paper]")] = None,
    config: Annotated[Optional[Path], Opt("--config", "-c", help="TOML file of settings (a \\[model] table for the network).")] = None,
    out_dir: Annotated[Optional[Path], Opt("--out", "-o", help="Run folder: last.pt, ema.safetensors, config.json, log.jsonl.")] = None,
    iterations: Annotated[Optional[int], Opt("--iterations", "-n", help="Total training iterations.")] = None,
    batch_size: Annotated[Optional[int], Opt("--batch-size", "-b", help="Global batch (split across torchrun processes).")] = None,
    patch_size: Annotated[Optional[int], Opt("--patch-size", help="Crop size (a multiple of the window, 8).")] = None,
    lr: Annotated[Optional[float], Opt("--lr", help="Adam learning rate.")] = None,
    milestones: Annotated[Optional[str], Opt("--milestones", help="Iterations where lr halves, e.g. 1000,2000 ('' for none).")] = None,
    noise_sigma: Annotated[Optional[str], Opt("--noise-sigma", help="Gaussian sigma of 255, e.g. 15, or LOW,HIGH drawn per patch (a blind model).")] = None,
    mask_ramp: Annotated[Optional[int], Opt("--mask-ramp", min=0, help="Iterations over which both mask ratios rise from 0 to their settings (a curriculum).")] = None,
    seed: Annotated[Optional[int], Opt("--seed", min=0, max=2**63 - 1, help="Seed of initialisation, crops, noise and masks.")] = None,
    baseline: Annotated[bool, Opt("--baseline", help="Train without masks (input mask and attention mask off).")] = False,
    resume: Annotated[bool, Opt("--resume", help="Continue the run in --out from its last.pt.")] = False,
    checkpoint_every: Annotated[Optional[int], Opt("--checkpoint-every", help="Write last.pt every N iterations.")] = None,
    log_every: Annotated[Optional[int], Opt("--log-every", help="Log line every N iterations.")] = None,
    val_every: Annotated[Optional[int], Opt("--val-every", help="Validate every K iterations.")] = None,
    val_clean: Annotated[Optional[Path], Opt("--val-clean", help="Clean images to validate on (seeded Gaussian 15, Poisson 2 and camera 4 noise).")] = None,
    val_pairs: Annotated[Optional[str], Opt("--val-pairs", help="NOISY_DIR:CLEAN_DIR pairs to validate on (same file names).")] = None,
    val_images: Annotated[Optional[int], Opt("--val-images", help="At most N validation images per set.")] = None,
    workers: Annotated[Optional[int], Opt("--workers", "-j", help="DataLoader worker processes \\[default: 0 on CPU, 8 on CUDA].")] = None,
    device: Annotated[Optional[str], Opt("--device", help="auto | cpu | cuda")] = None,
    precision: Annotated[Optional[str], Opt("--precision", help="auto | fp32 | bf16 (autocast; auto = bf16 on CUDA).")] = None,
    threads: Annotated[Optional[int], Opt("--threads", help="CPU threads \\[default: all cores; quick preset: 1].")] = None,
    export: Annotated[Optional[Path], Opt("--export", help="Also write the EMA weights here (.safetensors).")] = None,
    init: Annotated[Optional[str], Opt("--init", help="Start from these weights (a model name or file) instead of random ones.")] = None,
    quiet: Annotated[bool, Opt("--quiet", "-q", help="No progress bar or log lines.")] = False,
) -> None:
    """Train the masked-training denoiser on a folder of clean images."""
    from ..errors import MitdenoiseError

    resolved = _resolve(dict(locals()))  # every option as given: nothing else is defined yet
    main_rank = os.environ.get("RANK", "0") == "0"

    from ..train.loop import train

    try:
        show_library_log(quiet)
        with TrainDisplay(quiet or not main_rank) as display:
            result = train(resolved, resume=resume, observer=display)
    except MitdenoiseError as e:
        fail(str(e), 1)
    except ValueError as e:
        fail(str(e), 2)
    if main_rank:
        _say_how_it_ended(result)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


_PATH_SETTINGS = {"data": "data", "out_dir": "out", "val_clean": "val_clean", "export": "export"}
"""Options that are paths, and the setting each sets."""
_PLAIN_SETTINGS = ("iterations", "batch_size", "patch_size", "lr", "seed", "mask_ramp", "checkpoint_every", "log_every",
                   "val_every", "val_pairs", "val_images", "workers", "device", "precision", "threads", "init")
"""Options that set the setting of their name as they are."""


def _resolve(options: dict):
    """The run's settings: preset, then TOML, then the options given (``train.config.resolve_config``);
    a bad value exits with its one-line error."""
    from ..train.config import resolve_config

    overrides = {setting: str(options[name]) for name, setting in _PATH_SETTINGS.items() if options[name] is not None}
    overrides.update({name: options[name] for name in _PLAIN_SETTINGS if options[name] is not None})
    try:
        sigma = options["noise_sigma"]
        if sigma is not None:
            low, high = parse_range(sigma, "--noise-sigma", float)
            overrides["noise_sigma"] = low if "," not in sigma else [low, high]
        if options["milestones"] is not None:
            overrides["milestones"] = [int(m) for m in options["milestones"].replace(" ", "").split(",") if m]
        return resolve_config(options["preset"], options["config"], overrides, baseline=options["baseline"],
                              resume=options["resume"])
    except ValueError as e:
        fail(str(e), 2)


def _say_how_it_ended(result) -> None:
    """The run's last line: where its weights are, or where it stopped and how to go on."""
    if result.signal is not None:
        import signal

        name = signal.Signals(result.signal).name
        err.print(
            f"[yellow]stopped by {name} at iteration {result.iteration}[/]: checkpoint {escape(str(result.checkpoint))}; "
            f"continue with: mitdenoise train --out {escape(str(result.run_dir))} --resume",
            highlight=False,
            soft_wrap=True,
        )
    else:
        out.print(
            f"{result.iteration} iterations: weights {result.export}, checkpoint {result.checkpoint}",
            markup=False, highlight=False, soft_wrap=True,
        )


class TrainDisplay:
    """A training run on stderr: a rich bar on a terminal, else log lines; nothing when quiet.

    The observer :func:`mitdenoise.train.train` reports to (``train.report.TrainObserver``).
    """

    def __init__(self, quiet: bool, bar: bool | None = None) -> None:
        self.quiet = quiet
        self.bar = sys.stderr.isatty() if bar is None else bar
        self.progress = None
        self.total = 0
        self.psnr = ""

    def __enter__(self) -> "TrainDisplay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, iteration: int, total: int) -> None:
        self.total = total
        if self.quiet or not self.bar:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[psnr]}"), TextColumn("eta"),
            TimeRemainingColumn(), console=err,
        )
        self.task = self.progress.add_task("train", total=total, completed=iteration, rate="", loss="-", psnr="")
        self.progress.start()

    def message(self, text: str) -> None:
        if not self.quiet:
            err.print(text, markup=False, highlight=False, soft_wrap=True)

    def step(self, iteration: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=iteration)

    def metrics(self, record: dict) -> None:
        from ..train.report import metrics_line, psnr_text

        self.psnr = psnr_text(record) or self.psnr
        if self.quiet:
            return
        if self.progress is not None:
            loss = f"{record['loss']:.4f}" if "loss" in record else "-"
            rate = f"{record['it_per_s']:.2f} it/s" if "it_per_s" in record else ""
            self.progress.update(self.task, completed=record["iteration"], rate=rate, loss=loss, psnr=self.psnr)
        else:
            err.print(metrics_line(record, self.total, self.psnr), markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def main() -> None:
    """Run ``train_command`` as a program of its own (``python -m mitdenoise.train``)."""
    app = typer.Typer(
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.command(epilog=EPILOG)(train_command)
    run_app(app, prog_name="python -m mitdenoise.train")
