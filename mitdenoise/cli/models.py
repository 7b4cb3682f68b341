"""``mitdenoise models``, ``download`` and ``convert``: thin commands over the registry and checkpoints.

They import the library (and torch) only when run, so ``mitdenoise --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from ..errors import MitdenoiseError
from .console import DownloadBar, err, fail, out, parse_range, show_library_log


def models_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the registry as JSON (for scripts).")] = False,
) -> None:
    """List the models --model accepts by name: what each is, its size, cached or not.

    The default (downloaded on first use) and the fallback (shipped, runs where the default
    can't be had) are marked. Also accepted: hf://owner/repo/path/file.safetensors[@revision],
    or a path to a .pth/.safetensors file. Sources, checksums and licences: --json.

    Example:  mitdenoise models --json
    """
    from ..checkpoints import human_size
    from ..registry import list_models

    rows = list_models()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    # Four short columns, so a row fits an 80-column terminal in one or two lines.
    table = Table(caption=escape("Also: hf://owner/repo/file.safetensors[@revision], or a .pth/.safetensors path. "
                                 "Sources and licences: mitdenoise models --json"),
                  caption_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("name", no_wrap=True)
    table.add_column("what it is", ratio=1)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("cached", no_wrap=True)
    for row in rows:
        name = escape(row["name"])
        if row["default"]:
            name += " (default)"
        elif row["fallback"]:
            name += " (fallback)"
        if row["shipped"]:
            cached = "shipped" if row["cached"] else "missing"
        else:
            cached = "yes" if row["cached"] else "no"
        table.add_row(name, escape(row["description"]), human_size(row["size"]), cached)
    out.print(table, highlight=False)


def download_command(
    name: Annotated[str, typer.Argument(help="A registry name (see `mitdenoise models`) or hf://owner/repo/file.")],
    force: Annotated[bool, typer.Option("--force", "-f", help="Download again even if cached.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Download a model into the Hugging Face cache, verify and convert it; print its path.

    Example:  mitdenoise download masked-denoising
    """
    from ..registry import download

    show_library_log(quiet)
    try:
        with DownloadBar(quiet) as bar:
            path = download(name, force=force, on_download=bar)
    except MitdenoiseError as e:
        fail(str(e))
    typer.echo(str(path))


def convert_command(
    src: Annotated[Path, typer.Argument(help="Checkpoint to convert: the authors' .pth (or a .safetensors).")],
    dst: Annotated[Path, typer.Argument(help="Output .safetensors file.")],
    config: Annotated[
        Optional[str],
        typer.Option(help="Config as JSON (whole or some fields), a .json file, or a registry name whose settings to use."),
    ] = None,
    attn_mask_ratio: Annotated[
        Optional[str], typer.Option(help="Attention-mask ratio in percent: R, or LOW,HIGH; 0 = off.")
    ] = None,
    global_residual: Annotated[
        Optional[bool],
        typer.Option("--global-residual/--no-global-residual", help="Original SwinIR wiring (+x) or not. Default: from the shapes."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace DST if it exists.")] = False,
) -> None:
    """Convert a checkpoint to safetensors with its config in the metadata.

    Shapes give the architecture; --config, --attn-mask-ratio and
    --global-residual give what shapes can't tell.

    Example:  mitdenoise convert input_mask_80_90.pth masked.safetensors --attn-mask-ratio 75
    """
    from ..checkpoints import convert_checkpoint

    known = _config_option(config) if config else {}
    if attn_mask_ratio is not None:
        known["attn_mask_ratio"] = _ratio_option(attn_mask_ratio)
    if global_residual is not None:
        known["global_residual"] = global_residual
    if dst.suffix.lower() != ".safetensors":
        fail(f"the output {dst} must end in .safetensors", 2)
    if not src.is_file():
        fail(f"model file not found: {src}" + (" is a directory" if src.is_dir() else ""))
    if dst.exists() and not force:
        fail(f"{dst} exists (--force replaces it)")
    try:
        written = convert_checkpoint(src, dst, **known)
    except MitdenoiseError as e:
        fail(str(e))
    ratio = written.attn_mask_ratio
    mask = "off" if ratio[1] == 0 else (f"{ratio[0]} %" if ratio[0] == ratio[1] else f"{ratio[0]}-{ratio[1]} %")
    err.print(
        f"wrote {escape(str(dst))}: embed_dim {written.embed_dim}, depths {list(written.depths)}, "
        f"attention mask {mask}, global residual {'on' if written.global_residual else 'off'}",
        highlight=False, soft_wrap=True,
    )
    typer.echo(str(dst))


def _ratio_option(text: str) -> tuple[int, int]:
    try:
        return parse_range(text, "--attn-mask-ratio", percent=True)
    except ValueError as e:
        fail(str(e), 2)


def _config_option(text: str) -> dict:
    """Fields given by --config: a registry name, inline JSON, or a .json file."""
    import dataclasses

    from ..model import ModelConfig
    from ..registry import REGISTRY

    if text in REGISTRY:
        entry = REGISTRY[text]
        if entry.shipped:
            fail(f"--config {text}: the shipped model carries its config in its file; give JSON or another name", 2)
        return dataclasses.asdict(entry.config) if entry.config else dict(entry.known)
    source = "--config"
    if not text.lstrip().startswith(("{", "[")):
        path = Path(text)
        if not path.is_file():
            names = ", ".join(n for n, e in REGISTRY.items() if not e.shipped)
            fail(f"--config {text!r}: not JSON, not a .json file and not one of: {names}", 2)
        try:
            text = path.read_text()
        except OSError as e:
            fail(f"--config {path}: {e.strerror or e}", 2)
        source = f"--config {path}"
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"{source}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", 2)
    if not isinstance(fields, dict):
        fail(f"{source}: expected a JSON object of config fields", 2)
    valid = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - valid)
    if unknown:
        fail(f"{source}: unknown config fields {unknown} (valid: {', '.join(sorted(valid))})", 2)
    return fields
