"""The ``mitdenoise`` program: the typer app, ``--version``, and every command registered."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import __version__
from .bench import bench_app
from .console import out, run_app
from .denoise import EPILOG as DENOISE_EPILOG
from .denoise import denoise_command
from .models import convert_command, download_command, models_command
from .noise import noise_command
from .train import EPILOG as TRAIN_EPILOG
from .train import train_command

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


app.command("denoise", epilog=DENOISE_EPILOG)(denoise_command)
app.command("models", help="List the models --model accepts: name, source, size, cached or not, licence.")(models_command)
app.command("download", help="Fetch a model into the cache (verified, converted to safetensors).")(download_command)
app.command("convert", help="Convert an authors'-format .pth to our .safetensors (config in its metadata).")(convert_command)
app.command("train", epilog=TRAIN_EPILOG, help="Train the masked-training denoiser on a folder of clean images.")(train_command)
app.add_typer(bench_app, name="bench")
app.command("noise")(noise_command)


def run(program: typer.Typer | None = None, **kwargs) -> None:
    """The ``mitdenoise`` console script: :func:`~.console.run_app` on this app (or on ``program``)."""
    run_app(program or app, **kwargs)
