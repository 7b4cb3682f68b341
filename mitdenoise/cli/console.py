"""What every command shares: the two consoles, one-line errors, warnings and notes, threads,
and the entry point that turns errors and stop signals into exit codes.

Results go to stdout (``out``), progress and messages to stderr (``err``). Exit codes:
0 done, 1 failed, 2 a bad option value, 128 + N after stop signal N.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import Aborted, MitdenoiseError
from ..stopping import signal_exit_code

err = Console(stderr=True)
out = Console()


def error(message: str) -> None:
    """One ``error: ...`` line on stderr (the program goes on; see :func:`fail`)."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """One ``error: ...`` line on stderr, then exit with ``code`` (2: a bad option value)."""
    error(message)
    raise typer.Exit(code)


def warn(message: str) -> None:
    """One ``warning: ...`` line on stderr."""
    err.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """One ``note: ...`` line on stderr."""
    err.print(f"[yellow]note:[/] {escape(message)}", highlight=False, soft_wrap=True)


def notice(message: str) -> None:
    """One ``notice: ...`` line on stderr: something ran other than what the user may expect."""
    err.print(f"[yellow]notice:[/] {escape(message)}", highlight=False, soft_wrap=True)


class LibraryLog(logging.Handler):
    """The library's log (logger ``mitdenoise``) as lines on stderr: INFO as they are, warnings
    as ``warning: ...``. The library never writes to the terminal itself; this is how its news
    reaches a user of the command line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed log call must not end a run
            return
        if record.levelno >= logging.WARNING:
            warn(text)
        else:
            err.print(text, markup=False, highlight=False, soft_wrap=True)


LIBRARY_LOGGER = logging.getLogger("mitdenoise")


def show_library_log(quiet: bool = False) -> None:
    """Show the library's INFO log on stderr (``--quiet``: only its warnings)."""
    if not any(isinstance(h, LibraryLog) for h in LIBRARY_LOGGER.handlers):
        LIBRARY_LOGGER.addHandler(LibraryLog())
        LIBRARY_LOGGER.propagate = False
    LIBRARY_LOGGER.setLevel(logging.WARNING if quiet else logging.INFO)


def counting_bars(quiet: bool):
    """A rich progress display on stderr for counted work (files, tiles, benchmark units): each
    task a description, a bar, done/total and the time so far; gone when done, nothing when quiet."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, disable=quiet, transient=True)


class DownloadBar:
    """A rich download bar on stderr, driven by the library's ``on_download`` callback
    (:data:`mitdenoise.registry.DownloadProgress`); off with ``--quiet`` or
    ``HF_HUB_DISABLE_PROGRESS_BARS``. Use as a context manager around the call that may download."""

    def __init__(self, quiet: bool = False) -> None:
        from ..hub import is_true

        self.enabled = not quiet and not is_true(os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"))
        self.progress = None
        self.tasks: dict[str, object] = {}

    def __call__(self, name: str, received: int, total: int | None) -> None:
        if not self.enabled:
            return
        if self.progress is None:
            from rich.progress import (
                BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
            )

            self.progress = Progress(TextColumn("downloading {task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True)
            self.progress.start()
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(escape(name), total=total)
        self.progress.update(self.tasks[name], completed=received, total=total)

    def __enter__(self) -> "DownloadBar":
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def parse_range(text: str, option: str, number: type = int, percent: bool = False) -> tuple:
    """``"15"`` -> (15, 15), ``"0,50"`` -> (0, 50): an option's N or LOW,HIGH, LOW <= HIGH.

    ``percent`` also wants 0 <= LOW and HIGH < 100. ValueError naming ``option`` otherwise.
    """
    try:
        values = [number(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    bounds = " with 0 <= LOW <= HIGH < 100" if percent else " with LOW <= HIGH"
    if len(values) != 2 or values[0] > values[1] or (percent and not 0 <= values[0] <= values[1] < 100):
        raise ValueError(f"{option} must be N or LOW,HIGH{bounds}, not {text!r}")
    return values[0], values[1]


def set_threads(threads: Optional[int]) -> None:
    """``--threads``: torch's CPU thread count, unless None."""
    if threads is None:
        return
    if threads < 1:
        fail("--threads must be >= 1", 2)
    import torch

    torch.set_num_threads(threads)


def run_app(program: typer.Typer, **kwargs) -> None:
    """Run a typer app, turning any user-facing error into one line and a non-zero exit, and a
    second stop signal into 128 + its number (typer makes every KeyboardInterrupt 130).

    After an abort the process ends at once (``os._exit``, once the writers have removed
    their temp files on the way up): the chunk workers may still hold abandoned work, and
    waiting for them at interpreter exit could hang. Signals during that exit take their
    default action for the same reason.
    """
    warnings.showwarning = _show_warning
    show_library_log()
    try:
        program(**kwargs)
    except MitdenoiseError as e:
        error(str(e))
        sys.exit(1)
    except SystemExit as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, Aborted):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(signal_exit_code(cause.signum))
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning is one line on stderr, like our errors, not Python's file:line and source."""
    warn(str(message))
